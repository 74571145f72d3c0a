"""Copy a stream to a file while hashing it, with a size bound, then fsync; and find stale temp files."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from adapters.errors import AdapterInvalid, InvalidArgument

CHUNK_BYTES = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_sha256(digest: object, what: str = "sha256") -> str:
    """A lower-case hex sha256 digest; upper case is accepted and folded."""
    if isinstance(digest, str) and _SHA256.fullmatch(digest.lower()):
        return digest.lower()
    raise InvalidArgument(f"invalid {what} {digest!r}: expected 64 hexadecimal characters")


def copy_hashed(
    source: BinaryIO,
    fd: int,
    *,
    max_bytes: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[str, int]:
    """Copy ``source`` into the open file descriptor ``fd``, fsync it; return (sha256, size).

    ``on_chunk`` is called with the bytes written so far after each chunk (a progress
    and fault-injection seam). Raises AdapterInvalid past ``max_bytes``.
    """
    digest = hashlib.sha256()
    size = 0
    while True:
        chunk = source.read(CHUNK_BYTES)
        if not chunk:
            break
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise InvalidArgument("adapter data must be bytes or a binary stream opened in 'rb' mode")
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise AdapterInvalid(
                f"adapter file is larger than the store's limit of {max_bytes} bytes; "
                "raise max_blob_bytes when opening the store if this is intended"
            )
        digest.update(chunk)
        view = memoryview(chunk)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if on_chunk is not None:
            on_chunk(size)
    os.fsync(fd)
    return digest.hexdigest(), size


def hash_stream(source: BinaryIO) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while chunk := source.read(CHUNK_BYTES):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def fsync_dir(path: os.PathLike[str] | str) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stale_files(folder: Path, pattern: str, *, older_than_s: float = 0.0, remove: bool = False) -> list[str]:
    """Files in ``folder`` matching ``pattern`` not written for ``older_than_s`` seconds (removed if asked).

    A file that vanishes meanwhile (another process finished or cleaned it) is skipped.
    """
    found: list[str] = []
    cutoff = time.time() - older_than_s
    for entry in sorted(folder.glob(pattern)):
        try:
            if entry.stat().st_mtime > cutoff:
                continue
            if remove:
                entry.unlink()
        except FileNotFoundError:
            continue
        found.append(str(entry))
    return found
