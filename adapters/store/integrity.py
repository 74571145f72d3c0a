"""Every read of a stored blob into memory is checked against its sha256.

``read_checked`` reads a blob into one buffer of the file's size, hashing each chunk
as it arrives, so the bytes that are hashed are the bytes that are parsed, with no
second copy and no second read of the file. ``AdapterStore.read_blob`` and
``AdapterStore.load_version`` (what the server's resolver calls) turn a failure into
``adapters.errors.BlobDamaged`` (DATA_LOSS: the server's data is damaged, not the
caller's request) with one of ``LOAD_FAILURE_REASONS``, which ``LoadFailures`` counts
for ``loraloom_adapter_load_failures_total{reason}``. ``AdapterStore.verify`` applies
the same checks to every version.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import BinaryIO

from adapters.store.hashing import CHUNK_BYTES

SHA256_MISMATCH = "sha256_mismatch"
MISSING = "missing"
UNDECODABLE = "undecodable"
# The fixed label values of loraloom_adapter_load_failures_total{reason}.
LOAD_FAILURE_REASONS = (SHA256_MISMATCH, MISSING, UNDECODABLE)

# Module names that match nothing: a decode check needs no base model (kohya keys keep
# their flattened paths), like the store's validator without one.
NO_BASE_MODEL = frozenset({"unet.__no_base_model__"})


def read_checked(stream: BinaryIO) -> tuple[bytearray, str]:
    """All of ``stream`` in one buffer and the sha256 of exactly those bytes.

    The buffer is allocated once at the file's size and filled in place (``readinto``);
    a file that grows while it is read is read to its end all the same (then its
    digest cannot match).
    """
    digest = hashlib.sha256()
    try:
        size = os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        size = 0
    buffer = bytearray(size)
    view = memoryview(buffer)
    filled = 0
    try:
        while filled < size:
            count = stream.readinto(view[filled : min(size, filled + CHUNK_BYTES)])
            if not count:
                break
            digest.update(view[filled : filled + count])
            filled += count
    finally:
        view.release()
    if filled < size:  # shrank while read: what was read is what is hashed
        del buffer[filled:]
    while chunk := stream.read(CHUNK_BYTES):  # grew while read (or no size known)
        digest.update(chunk)
        buffer += chunk
    return buffer, digest.hexdigest()


def decode_check(data: bytearray) -> None:
    """Parse ``data`` as an adapter file the way the store's validator does without a base
    model; raises ``AdapterInvalid`` when it cannot be decoded."""
    from adapters.formats import load_adapter

    load_adapter(data, module_names=NO_BASE_MODEL)


class LoadFailures:
    """Thread-safe counts of failed loads of stored versions, by reason."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(LOAD_FAILURE_REASONS, 0)

    def record(self, reason: str) -> None:
        if reason not in self._counts:
            raise ValueError(f"unknown load failure reason {reason!r}; use one of {LOAD_FAILURE_REASONS}")
        with self._lock:
            self._counts[reason] += 1

    def snapshot(self) -> dict[str, int]:
        """Every reason with its count (zero included)."""
        with self._lock:
            return dict(self._counts)
