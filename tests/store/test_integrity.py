"""Every read of a stored blob into memory is checked against its sha256 (SQLite and PostgreSQL).

A changed, missing or undecodable blob of a stored version is ``BlobDamaged`` (DATA_LOSS) naming
the version and ``loraloom adapters verify``; it is counted by reason; ``verify`` reports it; every
other version keeps loading.
"""

from __future__ import annotations

import hashlib
import io
import tracemalloc

import pytest
import torch
from safetensors.torch import save

from adapters.errors import BlobDamaged, DataLoss
from adapters.safeparse import read_safetensors
from adapters.store import Damage
from adapters.store.integrity import LOAD_FAILURE_REASONS, read_checked
from adapters.store.models import AdapterFacts
from tests.store.damage import overwrite_tensor_bytes


def _blob(store, version):
    return store.blobs.path(version.sha256)


def test_read_blob_returns_the_checked_bytes_and_load_version_parses_them(store, lora, micro_shapes):
    data = lora(seed=1, rank=8, count=8)
    version = store.register("ink", data)
    assert bytes(store.read_blob(version)) == data
    adapter = store.load_version(store.resolve(["ink"])[0], micro_shapes)
    assert adapter.modules and max(adapter.ranks) == 8
    assert store.load_failures.snapshot() == dict.fromkeys(LOAD_FAILURE_REASONS, 0)


@pytest.mark.parametrize("value", [0.25, float("nan")], ids=["finite", "nan"])
def test_changed_bytes_are_data_loss_naming_the_version(store, lora, micro_shapes, value):
    damaged = store.register("ink", lora(seed=1, rank=8, count=8))
    intact = store.register("neon", lora(seed=2, rank=8, count=8))
    overwrite_tensor_bytes(_blob(store, damaged), value)

    for _ in range(2):  # the same answer each time
        with pytest.raises(BlobDamaged) as caught:
            store.load_version(store.resolve(["ink"])[0], micro_shapes)
        error = caught.value
        assert isinstance(error, DataLoss) and error.code == "DATA_LOSS"
        assert (error.reason, error.ref, error.sha256) == ("sha256_mismatch", "ink@1", damaged.sha256)
        assert "ink@1" in str(error) and "loraloom adapters verify" in str(error)
        assert "not by this request" in str(error)
    with pytest.raises(BlobDamaged):
        store.read_blob(damaged)
    assert store.load_failures.snapshot() == {"sha256_mismatch": 3, "missing": 0, "undecodable": 0}
    assert store.load_version(intact, micro_shapes).modules  # every other version keeps working

    report = store.verify()
    assert not report.ok and report.corrupt == (damaged.sha256,)
    assert report.damage == (Damage("ink@1", damaged.sha256, "sha256_mismatch"),)
    assert report.broken_versions == ("ink@1",)


def test_a_missing_blob_is_data_loss_not_not_found(store, lora, micro_shapes):
    gone = store.register("ink", lora(seed=1))
    store.register("ink", lora(seed=1))  # ink@2 shares the blob
    kept = store.register("neon", lora(seed=2))
    _blob(store, gone).unlink()
    with pytest.raises(BlobDamaged) as caught:
        store.load_version(store.resolve(["ink@1"])[0], micro_shapes)
    assert caught.value.reason == "missing" and "ink@1" in str(caught.value)
    assert store.list(latest_only=False).items[0].ref == "ink@1"  # still listed: the row is intact
    assert store.load_failures.snapshot()["missing"] == 1
    assert store.load_version(kept, micro_shapes).modules
    report = store.verify()
    assert report.missing == (gone.sha256,)
    assert [(item.ref, item.reason) for item in report.damage] == [("ink@1", "missing"), ("ink@2", "missing")]


def test_bytes_that_hash_right_but_do_not_decode_are_undecodable(make_store):
    """A version stored by a laxer validator (an older release) that this one cannot parse."""
    lax = make_store(validator=lambda path: AdapterFacts(rank=1, components=("unet",), format="kohya"))
    nan = save({"lora_unet_x.lora_down.weight": torch.full((1, 4), float("nan"))})
    version = lax.register("odd", nan)
    with pytest.raises(BlobDamaged) as caught:
        lax.load_version(version)
    assert caught.value.reason == "undecodable" and "odd@1" in str(caught.value)
    assert "cannot be decoded" in str(caught.value) and "non-finite" in str(caught.value)
    assert lax.load_failures.snapshot()["undecodable"] == 1
    report = lax.verify()
    assert report.undecodable == (version.sha256,) and not report.ok
    assert report.damage == (Damage("odd@1", version.sha256, "undecodable"),)


def test_uploading_the_same_bytes_again_repairs_a_damaged_blob(store, lora):
    data = lora(seed=1, rank=8, count=8)
    first = store.register("ink", data)
    overwrite_tensor_bytes(_blob(store, first), 0.25)
    assert not store.verify().ok
    store.register("ink", data)
    assert store.verify().clean
    assert bytes(store.read_blob(first)) == data


def test_read_checked_hashes_exactly_what_it_returns(tmp_path):
    data = bytes(range(256)) * 9000  # more than two read chunks
    path = tmp_path / "blob"
    path.write_bytes(data)
    with open(path, "rb") as stream:
        buffer, digest = read_checked(stream)
    assert isinstance(buffer, bytearray) and buffer == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert read_checked(io.BytesIO(data)) == (bytearray(data), digest)  # no file size to go by


def test_a_loaded_blob_is_held_once_not_copied(tmp_path):
    """read_blob fills one buffer of the file's size; the parser reads it in place (tensors are
    torch's, not Python's allocations), so Python's peak stays near one copy of the file."""
    data = save({"w": torch.zeros(2_000_000)})  # 8 MB
    buffer = bytearray(data)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        tensors, _ = read_safetensors(buffer)
        _, parse_peak = tracemalloc.get_traced_memory()
        path = tmp_path / "blob"
        path.write_bytes(data)
        tracemalloc.reset_peak()
        with open(path, "rb") as stream:
            read_checked(stream)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tensors["w"].shape == (2_000_000,)
    assert parse_peak < len(data) // 8, parse_peak  # no copy of the data section
    assert read_peak < 1.2 * len(data), read_peak  # one buffer, no chunk list joined at the end
