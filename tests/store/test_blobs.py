"""LocalBlobStorage: content addressing, the sha256 check, atomic placement."""

from __future__ import annotations

import hashlib
import io

import pytest

from adapters.errors import AdapterInvalid, InvalidArgument, NotFound
from adapters.store.blobs import LocalBlobStorage


def test_put_open_delete_iterate(tmp_path):
    blobs = LocalBlobStorage(tmp_path / "blobs")
    data = b"x" * 3_000_000  # several chunks
    sha = hashlib.sha256(data).hexdigest()
    info = blobs.put(io.BytesIO(data), expected_sha256=sha)
    assert (info.sha256, info.size_bytes) == (sha, len(data))
    assert blobs.exists(sha)
    assert blobs.path(sha) == tmp_path / "blobs" / sha[:2] / sha
    with blobs.open(sha) as stream:
        assert stream.read() == data
    assert list(blobs.iter_blobs()) == [sha]
    assert blobs.partials() == []
    # Blobs are immutable files.
    assert blobs.path(sha).stat().st_mode & 0o222 == 0
    # Putting the same bytes again is a no-op.
    assert blobs.put(io.BytesIO(data)).sha256 == sha
    assert blobs.delete(sha)
    assert not blobs.delete(sha)
    assert not blobs.exists(sha)
    with pytest.raises(NotFound):
        blobs.open(sha)
    with pytest.raises(NotFound):
        blobs.path(sha)


def test_sha_mismatch_leaves_nothing(tmp_path):
    blobs = LocalBlobStorage(tmp_path / "blobs")
    with pytest.raises(AdapterInvalid, match="sha256 mismatch"):
        blobs.put(io.BytesIO(b"abc"), expected_sha256="0" * 64)
    assert list(blobs.iter_blobs()) == []
    assert blobs.partials() == []


def test_size_limit(tmp_path):
    blobs = LocalBlobStorage(tmp_path / "blobs")
    with pytest.raises(AdapterInvalid, match="larger than"):
        blobs.put(io.BytesIO(b"a" * 100), max_bytes=10)
    assert list(blobs.iter_blobs()) == [] and blobs.partials() == []


def test_put_file_links_and_keys_are_only_digests(tmp_path):
    blobs = LocalBlobStorage(tmp_path / "blobs")
    source = tmp_path / "blobs" / "tmp" / "upload.bin"
    source.write_bytes(b"hello")
    sha = hashlib.sha256(b"hello").hexdigest()
    blobs.put_file(source, sha)
    assert blobs.path(sha).read_bytes() == b"hello"
    assert blobs.path(sha).stat().st_ino == source.stat().st_ino  # a hard link, not a copy
    for key in ("../../etc/passwd", "ab", "g" * 64):
        with pytest.raises(InvalidArgument):
            blobs.exists(key)


def test_partials_are_reported_by_age_and_removed(tmp_path):
    blobs = LocalBlobStorage(tmp_path / "blobs")
    leftover = blobs.tmp / "dead.part"
    leftover.write_bytes(b"half")
    assert blobs.partials(older_than_s=3600) == []  # may belong to a write in progress
    assert blobs.partials() == [str(leftover)]
    assert blobs.partials(remove=True) == [str(leftover)]
    assert not leftover.exists()
