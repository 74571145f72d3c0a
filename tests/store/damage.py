"""Damage a stored blob on disk the way a failing disk or a stray write would (store and API tests)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

DAMAGE_BYTES = 4096


def overwrite_tensor_bytes(path: Path, value: float, nbytes: int = DAMAGE_BYTES) -> None:
    """Overwrite the first ``nbytes`` of the file's tensor data with float32 ``value``s.

    The header stays intact, so the file still parses: with a finite ``value`` it is a valid
    adapter with other weights, with NaN one the parser refuses. The test files hold only F32
    tensors, whose data starts at multiples of 4 from the data section's start.
    """
    path = Path(path)
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    if len(raw) - start < nbytes:
        raise ValueError(f"{path} has only {len(raw) - start} bytes of tensor data; use a larger adapter")
    raw[start : start + nbytes] = struct.pack("<f", value) * (nbytes // 4)
    os.chmod(path, 0o644)
    path.write_bytes(raw)
    os.chmod(path, 0o444)


def local_blob(home: Path, sha256: str) -> Path:
    """Where the default store under ``home`` keeps the blob ``sha256``."""
    return Path(home) / "store" / "blobs" / sha256[:2] / sha256
