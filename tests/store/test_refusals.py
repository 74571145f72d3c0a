"""A bad file is refused with a specific message and leaves no row, no blob and no temp file."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save

from adapters.errors import AdapterIncompatible, AdapterInvalid, LoraloomError


def _raw_safetensors(header: dict, data: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def _kohya(**tensors: torch.Tensor) -> bytes:
    return save(tensors)


STEM = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def bad_files(micro_shapes, lora):
    """(case, bytes, error type, message fragment)."""
    out_f, in_f = micro_shapes["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    good = lora()
    nan_down = torch.randn(2, in_f)
    nan_down[0, 0] = float("nan")
    return [
        ("empty", b"", AdapterInvalid, "empty"),
        ("pickle", pickle.dumps({"w": [1, 2, 3]}), AdapterInvalid, "unpickle"),
        ("torch-zip", _torch_save(), AdapterInvalid, "unpickle"),
        ("truncated", good[: len(good) // 2], AdapterInvalid, ""),
        ("trailing-bytes", good + b"\0" * 16, AdapterInvalid, ""),
        ("huge-header-length", struct.pack("<Q", 1 << 40) + b"{}", AdapterInvalid, "header"),
        ("not-json", struct.pack("<Q", 4) + b"{{{{", AdapterInvalid, ""),
        (
            "bad-dtype",
            _raw_safetensors(
                {"x.lora_down.weight": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8
            ),
            AdapterInvalid,
            "F64",
        ),
        (
            "nan",
            _kohya(
                **{
                    f"{STEM}.lora_down.weight": nan_down,
                    f"{STEM}.lora_up.weight": torch.zeros(out_f, 2),
                    f"{STEM}.alpha": torch.tensor(2.0),
                }
            ),
            AdapterInvalid,
            "finite",
        ),
        (
            "rank-0",
            _kohya(
                **{
                    f"{STEM}.lora_down.weight": torch.zeros(0, in_f),
                    f"{STEM}.lora_up.weight": torch.zeros(out_f, 0),
                }
            ),
            AdapterInvalid,
            "rank",
        ),
        (
            "oft",
            _kohya(**{f"{STEM}.oft_blocks": torch.zeros(2, in_f // 2, in_f // 2)}),
            AdapterInvalid,
            "OFT",
        ),
        (
            "wrong-shape",
            _kohya(
                **{
                    f"{STEM}.lora_down.weight": torch.zeros(2, in_f + 3),
                    f"{STEM}.lora_up.weight": torch.zeros(out_f, 2),
                }
            ),
            AdapterIncompatible,
            "shape",
        ),
        (
            "unknown-module",
            _kohya(
                **{
                    "lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(2, 4),
                    "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(4, 2),
                }
            ),
            AdapterIncompatible,
            "no_such_block",
        ),
        (
            "other-architecture",
            lora(metadata={"ss_base_model_version": "sdxl_base_v1-0"}),
            AdapterIncompatible,
            "sdxl",
        ),
        ("no-lora-keys", _kohya(weight=torch.zeros(2, 2)), AdapterInvalid, "format"),
    ]


def _torch_save() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    return buffer.getvalue()


def _assert_nothing_left(store) -> None:
    assert store.list().items == ()
    assert list(store.blobs.iter_blobs()) == []
    report = store.verify()
    assert report.clean and report.checked == 0 and report.orphans == () and report.partials == ()
    assert list(store.staging_dir.iterdir()) == []
    assert list(store.blobs.tmp.iterdir()) == []


def test_each_bad_file_is_refused_and_leaves_nothing(store, micro_shapes, lora):
    cases = bad_files(micro_shapes, lora)
    assert len(cases) >= 15
    for case, data, error, fragment in cases:
        with pytest.raises(error) as caught:
            store.register("victim", data)
        assert fragment.lower() in str(caught.value).lower(), (case, str(caught.value))
        _assert_nothing_left(store)
    # The name was never created by any refused attempt: the first good one is version 1.
    assert store.register("victim", lora()).version == 1


def test_sha256_mismatch_leaves_nothing(store, lora):
    data = lora()
    with pytest.raises(AdapterInvalid, match="sha256 mismatch"):
        store.register("cat", data, expected_sha256=hashlib.sha256(data + b"x").hexdigest())
    _assert_nothing_left(store)


def test_size_limit_leaves_nothing(make_store, lora):
    store = make_store(max_blob_bytes=1000)
    with pytest.raises(AdapterInvalid, match="larger than the store's limit"):
        store.register("cat", io.BytesIO(lora()))
    _assert_nothing_left(store)


def test_a_failing_stream_leaves_nothing(store, lora):
    class Broken(io.RawIOBase):
        def __init__(self) -> None:
            self.sent = False

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            if self.sent:
                raise ConnectionResetError("client went away")
            self.sent = True
            return b"x" * 100

    with pytest.raises(ConnectionResetError):
        store.register("cat", Broken())
    _assert_nothing_left(store)


def test_every_refusal_is_a_loraloom_error(store, micro_shapes, lora):
    for _case, data, _error, _fragment in bad_files(micro_shapes, lora):
        with pytest.raises(LoraloomError):
            store.register("x", io.BytesIO(data))
