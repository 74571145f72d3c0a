"""S3-compatible blob storage (boto3) with a bounded local disk cache of blobs.

Several replicas share one bucket: uploads are write-once (``If-None-Match: *``) and
carry their SHA256 checksum, which S3 verifies on arrival; a key that already exists
is accepted once its checksum is seen to match (content addressing makes a second
writer of the same key a no-op). Reads download into a local cache folder (temp file,
fsync, rename after the bytes hashed to the key), bounded by bytes, evicting the
least recently used blob first.

Configuration from the environment: ``LORALOOM_S3_BUCKET`` (turns it on),
``LORALOOM_S3_PREFIX``, ``LORALOOM_S3_ENDPOINT`` (e.g. ``http://minio:9000``),
``LORALOOM_S3_REGION``, ``LORALOOM_BLOB_CACHE_MB``; credentials come the usual boto3 way
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, a profile or a
workload identity).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from adapters.errors import AdapterInvalid, InvalidArgument, NotFound
from adapters.store.blobs import BlobInfo, BlobStorage
from adapters.store.hashing import CHUNK_BYTES, check_sha256, copy_hashed, fsync_dir, stale_files

DEFAULT_CACHE_BYTES = 2048 << 20
TEMP_SUFFIX = ".part"
_KEY = re.compile(r"[0-9a-f]{2}/([0-9a-f]{64})")


@dataclass(frozen=True)
class S3Settings:
    """Where the blobs live and how much of them a replica keeps on its disk."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES


def _b64(sha256: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256)).decode("ascii")


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3BlobStorage(BlobStorage):
    """Blobs at ``s3://bucket/<prefix><sha[:2]>/<sha>``; a byte-bounded LRU cache in ``cache_dir``."""

    def __init__(
        self, settings: S3Settings, cache_dir: Path | str, *, client: Any = None, protect_s: float = 30.0
    ) -> None:
        """``protect_s``: a blob handed out by ``path`` is not evicted for this long (its reader may
        not have opened it yet); the cache may overshoot its budget meanwhile."""
        if settings.cache_bytes <= 0:
            raise InvalidArgument("the blob cache budget must be positive (LORALOOM_BLOB_CACHE_MB)")
        prefix = settings.prefix.strip("/")
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.cache_dir = Path(cache_dir)
        self.tmp = self.cache_dir / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        if client is None:
            import boto3

            client = boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region)
        self.client = client
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._handed_out: dict[str, float] = {}
        self.protect_s = protect_s
        self._cached_bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._scan_cache()

    def __repr__(self) -> str:
        return f"S3BlobStorage('s3://{self.bucket}/{self.prefix}', cache={str(self.cache_dir)!r})"

    # ------------------------------------------------------------------ keys

    def key(self, sha256: str) -> str:
        sha256 = check_sha256(sha256)
        return f"{self.prefix}{sha256[:2]}/{sha256}"

    def _cached(self, sha256: str) -> Path:
        return self.cache_dir / sha256[:2] / sha256

    # ------------------------------------------------------------------ writes

    def put(
        self, stream: BinaryIO, *, expected_sha256: str | None = None, max_bytes: int | None = None
    ) -> BlobInfo:
        if expected_sha256 is not None:
            expected_sha256 = check_sha256(expected_sha256, "expected_sha256")
        temp = self._temp()
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                sha256, _size = copy_hashed(stream, fd, max_bytes=max_bytes)
            finally:
                os.close(fd)
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise AdapterInvalid(
                    f"sha256 mismatch: expected {expected_sha256}, the received bytes hash to {sha256}; "
                    "the transfer was corrupted or the wrong file was sent"
                )
            return self.put_file(temp, sha256)
        finally:
            temp.unlink(missing_ok=True)

    def put_file(self, path: Path, sha256: str) -> BlobInfo:
        """Upload once (``If-None-Match: *``); an existing object must carry the same checksum."""
        sha256 = check_sha256(sha256)
        size = Path(path).stat().st_size
        with open(path, "rb") as body:
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self.key(sha256),
                    Body=body,
                    ContentLength=size,
                    IfNoneMatch="*",
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=_b64(sha256),
                )
            except Exception as exc:
                code = _error_code(exc)
                if code not in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                    raise
                self._check_existing(sha256, size)
        self._add_to_cache(path, sha256)
        return BlobInfo(sha256, size)

    def _check_existing(self, sha256: str, size: int) -> None:
        """Another writer got there first: accept its object only if it holds the same bytes."""
        head = self.client.head_object(Bucket=self.bucket, Key=self.key(sha256), ChecksumMode="ENABLED")
        remote = head.get("ChecksumSHA256")
        if remote is not None and "-" not in remote:
            good = remote == _b64(sha256)
        else:
            with self._download(sha256):  # raises AdapterInvalid unless the bytes hash to the key
                good = True
        if not good or int(head.get("ContentLength", size)) != size:
            raise AdapterInvalid(
                f"s3://{self.bucket}/{self.key(sha256)} exists with different content; "
                "the bucket holds a corrupt blob: delete that object and upload again"
            )

    # ------------------------------------------------------------------ reads

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path(sha256), "rb")

    def path(self, sha256: str) -> Path:
        """The blob in the local cache, downloaded (and verified) first when missing."""
        sha256 = check_sha256(sha256)
        final = self._cached(sha256)
        with self._lock:
            if sha256 in self._lru and final.is_file():
                self._lru.move_to_end(sha256)
                self._handed_out[sha256] = time.monotonic()
                self.hits += 1
                return final
            self.misses += 1
        with self._download(sha256) as temp:
            self._add_to_cache(temp, sha256)
        return final

    def _download(self, sha256: str) -> _Download:
        return _Download(self, sha256)

    def exists(self, sha256: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except Exception as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def delete(self, sha256: str) -> bool:
        found = self.exists(sha256)
        if found:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        with self._lock:
            size = self._lru.pop(sha256, None)
            if size is not None:
                self._cached_bytes -= size
                self._cached(sha256).unlink(missing_ok=True)
        return found

    def iter_blobs(self) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for item in page.get("Contents", ()):
                match = _KEY.fullmatch(item["Key"][len(self.prefix) :])
                if match and match.group(1).startswith(item["Key"][len(self.prefix) : len(self.prefix) + 2]):
                    yield match.group(1)

    def partials(self, *, older_than_s: float = 0.0, remove: bool = False) -> list[str]:
        """Temp files of interrupted downloads/uploads in the cache (S3 puts are atomic)."""
        return stale_files(self.tmp, f"*{TEMP_SUFFIX}", older_than_s=older_than_s, remove=remove)

    # ------------------------------------------------------------------ cache

    def drop_cached(self, sha256: str) -> bool:
        """Remove the local copy (it failed its check on a read); the next read downloads it again."""
        sha256 = check_sha256(sha256)
        with self._lock:
            size = self._lru.pop(sha256, None)
            if size is not None:
                self._cached_bytes -= size
            self._handed_out.pop(sha256, None)
            final = self._cached(sha256)
            present = final.exists()
            final.unlink(missing_ok=True)
        return present or size is not None

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def cache_stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "bytes": self._cached_bytes,
                "blobs": len(self._lru),
                "budget_bytes": self.settings.cache_bytes,
            }

    def _temp(self) -> Path:
        return self.tmp / f"{secrets.token_hex(8)}{TEMP_SUFFIX}"

    def _scan_cache(self) -> None:
        """Adopt blobs left by an earlier run, oldest use first (they were verified before the rename)."""
        found: list[tuple[float, str, int]] = []
        for folder in self.cache_dir.iterdir():
            if len(folder.name) != 2 or not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if len(entry.name) == 64 and entry.name.startswith(folder.name) and entry.is_file():
                    stat = entry.stat()
                    found.append((stat.st_mtime, entry.name, stat.st_size))
        with self._lock:
            for _mtime, sha256, size in sorted(found):
                self._lru[sha256] = size
                self._cached_bytes += size
            self._evict()

    def _add_to_cache(self, source: Path, sha256: str) -> None:
        """Copy (or move, for our own temp files) verified bytes into the cache under their name."""
        final = self._cached(sha256)
        final.parent.mkdir(exist_ok=True)
        if Path(source).parent == self.tmp:
            temp = Path(source)
        else:
            temp = self._temp()
            with open(source, "rb") as src:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    copy_hashed(src, fd)
                finally:
                    os.close(fd)
        size = temp.stat().st_size
        os.chmod(temp, 0o444)
        os.replace(temp, final)
        fsync_dir(final.parent)
        with self._lock:
            previous = self._lru.pop(sha256, None)
            self._cached_bytes += size - (previous or 0)
            self._lru[sha256] = size
            self._handed_out[sha256] = time.monotonic()
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used blobs past the budget, except those handed out within ``protect_s``."""
        now = time.monotonic()
        self._handed_out = {
            sha: moment for sha, moment in self._handed_out.items() if now - moment < self.protect_s
        }
        for candidate in list(self._lru):
            if self._cached_bytes <= self.settings.cache_bytes:
                break
            if candidate in self._handed_out:
                continue
            size = self._lru.pop(candidate)
            self._cached_bytes -= size
            self.evictions += 1
            self._cached(candidate).unlink(missing_ok=True)


class _Download:
    """Context manager: the blob downloaded into a verified temp file in the cache's tmp folder."""

    def __init__(self, storage: S3BlobStorage, sha256: str) -> None:
        self.storage = storage
        self.sha256 = sha256
        self.temp = storage._temp()

    def __enter__(self) -> Path:
        storage = self.storage
        try:
            response = storage.client.get_object(
                Bucket=storage.bucket, Key=storage.key(self.sha256), ChecksumMode="ENABLED"
            )
        except Exception as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise NotFound(
                    f"blob {self.sha256} is missing from s3://{storage.bucket}/{storage.prefix}; "
                    "run the store's verify"
                ) from None
            raise
        digest = hashlib.sha256()
        body = response["Body"]
        fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            while chunk := body.read(CHUNK_BYTES):
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.temp.unlink(missing_ok=True)
            raise
        os.close(fd)
        if digest.hexdigest() != self.sha256:
            self.temp.unlink(missing_ok=True)
            raise AdapterInvalid(
                f"s3://{storage.bucket}/{storage.key(self.sha256)} hashes to {digest.hexdigest()}, "
                "not its name; the object is corrupt: delete it and upload the adapter again"
            )
        return self.temp

    def __exit__(self, *exc_info: object) -> None:
        self.temp.unlink(missing_ok=True)
