"""``read_safetensors`` reads a file's data section once and returns views on it, not copies."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.blend import prepare_module
from adapters.canonical import LoraModule
from adapters.errors import AdapterInvalid
from adapters.safeparse import peek_header, read_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.lora_down.weight": torch.randn(4, 32, generator=generator),
        "a.lora_up.weight": torch.randn(16, 4, generator=generator),
        "b.alpha": torch.tensor(4.0),
        "c.half": torch.randn(8, 8, generator=generator).half(),
    }


def _frame(tensors: dict[str, tuple[str, list[int], bytes]], pad_to: int) -> bytes:
    """A safetensors file by hand, its header padded to a length ``pad_to`` apart from 8."""
    header, chunks, offset = {}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * ((pad_to - (8 + len(text)) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def test_a_files_tensors_are_views_on_one_buffer_with_safetensors_values(tmp_path):
    path = tmp_path / "f.safetensors"
    save_file(_tensors(), str(path))
    tensors, _ = read_safetensors(path)
    expected = load_file(str(path))
    assert tensors.keys() == expected.keys()
    for name, tensor in tensors.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    # One buffer, read once, no tensor cloned: each tensor sits at its data offset from the first.
    header = peek_header(path)
    first = min(header.tensors.values(), key=lambda info: info.begin)
    for info in header.tensors.values():
        moved = tensors[info.name].data_ptr() - tensors[first.name].data_ptr()
        assert moved == info.begin - first.begin, info.name


@pytest.mark.parametrize("source", ["bytes", "bytearray"])
def test_bytes_and_the_stores_bytearray_read_the_same(tmp_path, source):
    path = tmp_path / "f.safetensors"
    save_file(_tensors(), str(path))
    data = path.read_bytes()
    tensors, _ = read_safetensors(data if source == "bytes" else bytearray(data))
    for name, tensor in load_file(str(path)).items():
        assert torch.equal(tensors[name], tensor), name


def test_tensors_not_aligned_to_their_element_size_are_copied_and_read_right():
    """A writer that did not pad its header: a float32 tensor starting at an odd address."""
    values = torch.arange(6, dtype=torch.float32)
    data = _frame({"x": ("F32", [6], values.numpy().tobytes())}, pad_to=3)
    assert (len(data) - 24) % 4  # the data section does not start 4-aligned
    tensors, _ = read_safetensors(bytearray(data))
    assert torch.equal(tensors["x"], values)
    assert tensors["x"].data_ptr() % 4 == 0


def test_a_non_finite_value_in_a_run_of_tensors_names_its_tensor():
    good = torch.ones(4).numpy().tobytes()
    bad = torch.tensor([1.0, float("nan"), 2.0]).numpy().tobytes()
    data = _frame(
        {"first": ("F32", [4], good), "second": ("F32", [3], bad), "third": ("F32", [4], good)}, pad_to=8
    )
    with pytest.raises(AdapterInvalid, match="tensor 'second' holds 1 non-finite value"):
        read_safetensors(data)


def test_a_prepared_factor_holds_its_own_bytes_not_the_files(tmp_path):
    """A cached adapter must not keep the whole file's buffer alive through a view of it."""
    path = tmp_path / "f.safetensors"
    save_file({"down": torch.randn(4, 32), "up": torch.randn(16, 4)}, str(path))
    tensors, _ = read_safetensors(path)
    module = LoraModule(down=tensors["down"], up=tensors["up"], alpha=4.0)
    prepared = prepare_module(module, (16, 32))
    down = prepared.low_rank.down
    assert down.data_ptr() != tensors["down"].data_ptr()  # a copy, not a view of the file's buffer
    assert torch.equal(down, tensors["down"])
