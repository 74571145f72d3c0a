"""The base model's fingerprint (sha256 over every weight), remembered per model files.

Hashing every weight takes seconds at real size (SD 1.5: ~4 s of a restart, SDXL
in float32 about four times that), and it is the same on every start: the weights
are a function of the model's files and of the dtype they are loaded in. So the
fingerprint is kept in the data folder's cache under a key made of the files'
paths, sizes and modification times and the dtype; a restart reads it back, and
any change to a file (a new size or time) hashes the weights again. Built-in
models have no files to key on (the factory's are built from a seed): they are
hashed each time, in milliseconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1  # bump when what the fingerprint hashes changes


def files_key(path: Path, dtype: object) -> str | None:
    """A key naming ``path``'s files as they are now (a folder: every file under it) and the
    dtype they are loaded in; ``None`` when they cannot be listed."""
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        stats = [(str(p.resolve()), p.stat()) for p in files]
    except OSError:
        return None
    digest = hashlib.sha256(f"v{FINGERPRINT_VERSION}|{dtype}".encode())
    for name, stat in stats:
        digest.update(f"|{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def remembered(key: str | None, compute: Callable[[], str]) -> str:
    """The fingerprint kept under ``key`` in the cache, else ``compute()`` (then kept)."""
    if key is None:
        return compute()
    from adapters.home import cache_dir

    try:
        path = cache_dir() / "fingerprints" / key
    except OSError as error:  # no data folder to keep it in
        log.debug("base model fingerprint not cached: %s", error)
        return compute()
    try:
        text = path.read_text(encoding="ascii").strip()
        if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
            return text
    except (OSError, UnicodeDecodeError):
        pass
    fingerprint = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(fingerprint, encoding="ascii")
        partial.replace(path)  # atomic: a reader sees the whole fingerprint or none
    except OSError as error:
        log.debug("base model fingerprint not kept in the cache: %s", error)
    return fingerprint
