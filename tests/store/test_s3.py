"""S3BlobStorage against moto's S3 server over HTTP: write-once, checksums, the LRU disk cache."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import replace

import pytest

from adapters.errors import AdapterInvalid, NotFound
from adapters.store import make_validator
from adapters.store.s3 import S3BlobStorage
from adapters.store.settings import StoreSettings
from adapters.store.store import open_store
from tests.store import s3_fixtures
from tests.store.conftest import MICRO_BASE, kohya_file
from tests.store.s3_fixtures import s3_client

moto_endpoint = s3_fixtures.moto_endpoint
s3_settings = s3_fixtures.s3_settings


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_read_list_delete(s3_settings, tmp_path):
    storage = S3BlobStorage(s3_settings, tmp_path / "cache")
    data = os.urandom(5000)
    info = storage.put(io.BytesIO(data))
    assert info.sha256 == sha(data) and info.size_bytes == 5000
    client = s3_client(s3_settings.endpoint_url)
    key = f"blobs/{info.sha256[:2]}/{info.sha256}"
    head = client.head_object(Bucket=s3_settings.bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ContentLength"] == 5000 and head.get("ChecksumSHA256")
    assert storage.exists(info.sha256) and list(storage.iter_blobs()) == [info.sha256]

    other = S3BlobStorage(s3_settings, tmp_path / "other-cache")  # a second replica
    with other.open(info.sha256) as stream:
        assert stream.read() == data
    assert other.cache_stats()["misses"] == 1
    assert other.path(info.sha256).read_bytes() == data
    assert other.cache_stats()["hits"] == 1

    assert storage.delete(info.sha256) and not storage.exists(info.sha256)
    assert not storage.delete(info.sha256)
    with pytest.raises(NotFound):
        S3BlobStorage(s3_settings, tmp_path / "third").path(info.sha256)


def test_write_once_accepts_same_bytes_refuses_other(s3_settings, tmp_path):
    storage = S3BlobStorage(s3_settings, tmp_path / "cache")
    data = b"adapter bytes" * 100
    first = storage.put(io.BytesIO(data))
    assert storage.put(io.BytesIO(data)) == first  # the object exists: 412, checksum matches, success
    # a corrupt object under a valid name (written around the store) is refused, never overwritten
    client = s3_client(s3_settings.endpoint_url)
    evil = sha(b"other bytes")
    client.put_object(Bucket=s3_settings.bucket, Key=storage.key(evil), Body=b"not those bytes")
    path = tmp_path / "blob"
    path.write_bytes(b"other bytes")
    with pytest.raises(AdapterInvalid, match="different content|corrupt"):
        storage.put_file(path, evil)
    fresh = S3BlobStorage(s3_settings, tmp_path / "fresh")
    with pytest.raises(AdapterInvalid, match="corrupt"):
        fresh.path(evil)
    assert fresh.cache_stats()["blobs"] == 0 and not list(fresh.tmp.iterdir())


def test_uploads_carry_their_sha256_checksum(s3_settings, tmp_path):
    """S3 stores (and verifies, on real S3) the SHA256 we send; moto records but does not verify it."""
    import base64

    storage = S3BlobStorage(s3_settings, tmp_path / "cache")
    info = storage.put(io.BytesIO(b"real bytes"))
    head = s3_client(s3_settings.endpoint_url).head_object(
        Bucket=s3_settings.bucket, Key=storage.key(info.sha256), ChecksumMode="ENABLED"
    )
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == sha(b"real bytes")
    with pytest.raises(AdapterInvalid, match="mismatch"):
        storage.put(io.BytesIO(b"real bytes"), expected_sha256=sha(b"claimed bytes"))
    assert not storage.exists(sha(b"claimed bytes"))


def test_cache_is_lru_bounded_by_bytes(s3_settings, tmp_path):
    writer = S3BlobStorage(s3_settings, tmp_path / "writer")
    blobs = [os.urandom(400_000) for _ in range(3)]
    digests = [writer.put(io.BytesIO(data)).sha256 for data in blobs]
    reader = S3BlobStorage(replace(s3_settings, cache_bytes=900_000), tmp_path / "reader", protect_s=0)
    reader.path(digests[0])
    reader.path(digests[1])
    reader.path(digests[0])  # 0 is now the most recently used
    reader.path(digests[2])  # over budget: evicts 1
    stats = reader.cache_stats()
    assert stats["evictions"] == 1 and stats["bytes"] == 800_000 and stats["hits"] == 1
    cached = {entry.name for entry in (tmp_path / "reader").glob("??/*")}
    assert cached == {digests[0], digests[2]}
    # a restart adopts the cache it left behind
    again = S3BlobStorage(replace(s3_settings, cache_bytes=900_000), tmp_path / "reader", protect_s=0)
    assert again.cache_stats()["blobs"] == 2
    assert again.path(digests[2]).read_bytes() == blobs[2] and again.cache_stats()["hits"] == 1


def test_paths_just_handed_out_are_not_evicted(s3_settings, tmp_path):
    """A reader that got a path but has not opened it yet keeps its file; the budget overshoots a while."""
    writer = S3BlobStorage(s3_settings, tmp_path / "writer")
    digests = [writer.put(io.BytesIO(os.urandom(400_000))).sha256 for _ in range(3)]
    reader = S3BlobStorage(replace(s3_settings, cache_bytes=900_000), tmp_path / "reader", protect_s=60)
    paths = [reader.path(digest) for digest in digests]
    assert all(path.is_file() for path in paths)
    assert reader.cache_stats()["evictions"] == 0 and reader.cached_bytes == 1_200_000


def test_store_settings_from_env():
    """The S3 variables become the store settings; open_store builds S3 blob storage from them."""
    assert StoreSettings.from_env({}).s3_bucket is None
    settings = StoreSettings.from_env(
        {
            "LORALOOM_S3_BUCKET": "b",
            "LORALOOM_S3_PREFIX": "p",
            "LORALOOM_S3_ENDPOINT": "http://x:9000",
            "LORALOOM_BLOB_CACHE_MB": "3",
            "LORALOOM_STORE_DB_URL": "sqlite:////tmp/x.sqlite3",
        }
    )
    assert (settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint) == ("b", "p", "http://x:9000")
    assert (settings.blob_cache_mb, settings.store_db_url) == (3, "sqlite:////tmp/x.sqlite3")


def test_store_on_s3_is_shared_between_two_openers(s3_settings, tmp_path, micro_shapes):
    """open_store picks S3 from the settings; a second home sees the version and its bytes."""
    db_url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    settings = StoreSettings(
        home=tmp_path / "a",
        store_db_url=db_url,
        s3_bucket=s3_settings.bucket,
        s3_endpoint=s3_settings.endpoint_url,
    )
    validator = make_validator(micro_shapes, MICRO_BASE)
    data = kohya_file(micro_shapes, seed=3)
    with open_store(settings, validator=validator) as first:
        assert isinstance(first.blobs, S3BlobStorage)
        version = first.register("style", data)
    assert not (tmp_path / "a" / "store" / "blobs").exists()
    with open_store(replace(settings, home=tmp_path / "b"), validator=validator) as second:
        assert second.blob_path("style").read_bytes() == data
        assert second.get("style").sha256 == version.sha256
        assert second.verify().ok


def test_every_read_of_an_s3_blob_is_checked(s3_settings, tmp_path, micro_shapes):
    """A damaged local copy is dropped and fetched again; a damaged or missing object is DATA_LOSS
    naming the version, and verify reports it."""
    from adapters.errors import BlobDamaged
    from tests.store.damage import overwrite_tensor_bytes

    settings = StoreSettings(
        home=tmp_path / "a",
        store_db_url=f"sqlite:///{tmp_path / 'shared.sqlite3'}",
        s3_bucket=s3_settings.bucket,
        s3_endpoint=s3_settings.endpoint_url,
    )
    data = kohya_file(micro_shapes, seed=3, rank=8, count=8)
    with open_store(settings, validator=make_validator(micro_shapes, MICRO_BASE)) as store:
        version = store.register("style", data)
        store.register("other", kohya_file(micro_shapes, seed=4))
        overwrite_tensor_bytes(store.blobs.path(version.sha256), 0.25)  # the replica's cached copy
        assert bytes(store.read_blob(version)) == data
        assert store.load_failures.snapshot()["sha256_mismatch"] == 0

        tampered = bytearray(data)
        tampered[-4:] = b"\0\0\0\0"
        s3_client(s3_settings.endpoint_url).put_object(
            Bucket=s3_settings.bucket, Key=store.blobs.key(version.sha256), Body=bytes(tampered)
        )
        store.blobs.drop_cached(version.sha256)
        with pytest.raises(BlobDamaged) as caught:
            store.load_version(version, micro_shapes)
        assert (caught.value.reason, caught.value.ref) == ("sha256_mismatch", "style@1")
        report = store.verify()
        assert report.corrupt == (version.sha256,) and report.broken_versions == ("style@1",)

        s3_client(s3_settings.endpoint_url).delete_object(
            Bucket=s3_settings.bucket, Key=store.blobs.key(version.sha256)
        )
        with pytest.raises(BlobDamaged) as caught:
            store.read_blob(version)
        assert caught.value.reason == "missing"
        assert store.load_version(store.get("other"), micro_shapes).modules
