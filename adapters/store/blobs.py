"""Content-addressed blob storage: the bytes of every adapter version, keyed by sha256.

``BlobStorage`` is deliberately small so an object-store class (boto3) fits it;
``LocalBlobStorage`` keeps blobs in a folder. A blob appears under its final
name only once fully written and fsynced (temp file in the same folder, fsync,
rename, fsync of the directory), so a crash never leaves a truncated blob
under a valid name, only a temp file that ``partials`` reports and removes.
"""

from __future__ import annotations

import errno
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from adapters.errors import AdapterInvalid, NotFound
from adapters.store.hashing import check_sha256, copy_hashed, fsync_dir, hash_stream, stale_files


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    size_bytes: int


class BlobStorage(ABC):
    """Where blobs live. Keys are lower-case sha256 hex digests and nothing else."""

    @abstractmethod
    def put(
        self, stream: BinaryIO, *, expected_sha256: str | None = None, max_bytes: int | None = None
    ) -> BlobInfo:
        """Store the bytes of ``stream`` under their sha256; refuse them if it is not ``expected_sha256``."""

    def put_file(self, path: Path, sha256: str) -> BlobInfo:
        """Store a local file whose sha256 the caller already computed (and checked on the way in)."""
        with open(path, "rb") as stream:
            return self.put(stream, expected_sha256=sha256)

    @abstractmethod
    def open(self, sha256: str) -> BinaryIO:
        """A binary stream of the blob; NotFound if it does not exist."""

    @abstractmethod
    def path(self, sha256: str) -> Path:
        """A local file holding the blob (a remote storage downloads it to a cache first)."""

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    def delete(self, sha256: str) -> bool:
        """Remove the blob; False if it was not there."""

    @abstractmethod
    def iter_blobs(self) -> Iterator[str]:
        """Every stored sha256 (order unspecified)."""

    def partials(self, *, older_than_s: float = 0.0, remove: bool = False) -> list[str]:
        """Leftovers of interrupted writes older than ``older_than_s``; removed when ``remove``."""
        return []

    def drop_cached(self, sha256: str) -> bool:
        """Forget a local copy of a remote blob (it failed its check; the next read fetches it
        again); False when there is none, as for storage that is local to begin with."""
        return False


class LocalBlobStorage(BlobStorage):
    """Blobs in ``root/<sha[:2]>/<sha>``, read-only files; temp files in ``root/tmp``."""

    TEMP_SUFFIX = ".part"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalBlobStorage({str(self.root)!r})"

    def _final(self, sha256: str) -> Path:
        sha256 = check_sha256(sha256)
        return self.root / sha256[:2] / sha256

    def put(
        self, stream: BinaryIO, *, expected_sha256: str | None = None, max_bytes: int | None = None
    ) -> BlobInfo:
        if expected_sha256 is not None:
            expected_sha256 = check_sha256(expected_sha256, "expected_sha256")
        temp = self.tmp / f"{secrets.token_hex(8)}{self.TEMP_SUFFIX}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                sha256, size = copy_hashed(stream, fd, max_bytes=max_bytes)
            finally:
                os.close(fd)
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise AdapterInvalid(
                    f"sha256 mismatch: expected {expected_sha256}, the received bytes hash to {sha256}; "
                    "the transfer was corrupted or the wrong file was sent"
                )
            os.chmod(temp, 0o444)
            final = self._final(sha256)
            final.parent.mkdir(exist_ok=True)
            os.replace(temp, final)
            fsync_dir(final.parent)
            return BlobInfo(sha256, size)
        finally:
            temp.unlink(missing_ok=True)

    def put_file(self, path: Path, sha256: str) -> BlobInfo:
        """Hard-link ``path`` into place (no copy) when it is on the same file system.

        A blob already there is kept if it still hashes to its name and replaced otherwise,
        so uploading the same file again repairs a damaged blob.
        """
        final = self._final(sha256)
        final.parent.mkdir(exist_ok=True)
        try:
            os.chmod(path, 0o444)
            os.link(path, final)
        except FileExistsError:
            if not self._intact(final, sha256):
                self._replace(path, final)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            return super().put_file(path, sha256)
        fsync_dir(final.parent)
        return BlobInfo(final.name, final.stat().st_size)

    @staticmethod
    def _intact(final: Path, sha256: str) -> bool:
        try:
            with open(final, "rb") as stream:
                return hash_stream(stream)[0] == sha256
        except FileNotFoundError:
            return False

    def _replace(self, path: Path, final: Path) -> None:
        """Put ``path``'s bytes (already checked by the caller) over a damaged blob, atomically."""
        temp = self.tmp / f"{secrets.token_hex(8)}{self.TEMP_SUFFIX}"
        try:
            try:
                os.link(path, temp)
            except OSError:
                with open(path, "rb") as source:
                    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
                    try:
                        copy_hashed(source, fd)
                    finally:
                        os.close(fd)
            os.replace(temp, final)
            fsync_dir(final.parent)
        finally:
            temp.unlink(missing_ok=True)

    def open(self, sha256: str) -> BinaryIO:
        try:
            return open(self._final(sha256), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {sha256} is missing from {self.root}; run the store's verify") from None

    def path(self, sha256: str) -> Path:
        final = self._final(sha256)
        if not final.is_file():
            raise NotFound(f"blob {sha256} is missing from {self.root}; run the store's verify")
        return final

    def exists(self, sha256: str) -> bool:
        return self._final(sha256).is_file()

    def delete(self, sha256: str) -> bool:
        final = self._final(sha256)
        try:
            final.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(final.parent)
        return True

    def iter_blobs(self) -> Iterator[str]:
        for folder in sorted(self.root.iterdir()):
            if len(folder.name) != 2 or not folder.is_dir():
                continue
            for entry in sorted(folder.iterdir()):
                if len(entry.name) == 64 and entry.name.startswith(folder.name) and entry.is_file():
                    yield entry.name

    def partials(self, *, older_than_s: float = 0.0, remove: bool = False) -> list[str]:
        return stale_files(self.tmp, f"*{self.TEMP_SUFFIX}", older_than_s=older_than_s, remove=remove)
