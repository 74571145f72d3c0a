"""The base model's fingerprint is hashed once per model files and read back on a restart (#22)."""

from __future__ import annotations

import os

import torch

from server.models.fingerprint import files_key
from server.models.loader import load_base_model


def saved_micro(folder):
    micro = load_base_model("micro")
    micro.pipeline.save_pretrained(folder, safe_serialization=True)
    return micro


def test_a_restart_reads_the_fingerprint_back_and_a_changed_file_hashes_again(tmp_path, loraloom_home):
    folder = tmp_path / "model"
    micro = saved_micro(folder)
    first = load_base_model(folder)
    assert first.files_key is not None
    assert first.fingerprint == micro.fingerprint  # the same weights, hashed
    kept = loraloom_home / "cache" / "fingerprints" / first.files_key
    assert kept.read_text() == first.fingerprint

    kept.write_text("f" * 64)  # what a restart reads, not hashed again
    assert load_base_model(folder).fingerprint == "f" * 64

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = load_base_model(folder)
    assert changed.files_key != first.files_key
    assert changed.fingerprint == micro.fingerprint  # hashed again


def test_the_key_names_the_dtype_and_a_broken_cache_entry_is_hashed_again(tmp_path, loraloom_home):
    folder = tmp_path / "model"
    micro = saved_micro(folder)
    assert files_key(folder, torch.float32) != files_key(folder, torch.bfloat16)
    first = load_base_model(folder)
    assert first.fingerprint == micro.fingerprint
    (loraloom_home / "cache" / "fingerprints" / first.files_key).write_text("not a digest")
    assert load_base_model(folder).fingerprint == micro.fingerprint
    assert load_base_model("micro").files_key is None  # built from a seed: nothing to key on
