"""The less common options together on the micro model: each runs, exports and validates."""

from __future__ import annotations

import json

import pytest
import torch
from imagegen import make_folder

from adapters.formats import load_adapter
from server.models.loader import load_base_model
from trainer import TrainConfig, train


def test_text_encoder_buckets_accumulation_snr_offset_and_captions(tmp_path, one_thread):
    data = make_folder(tmp_path / "mixed", 6, sizes=[(48, 24), (24, 48), (32, 32)], convention="jsonl")
    config = TrainConfig(
        data_dir=str(data),
        name="mixed",
        base="micro",
        steps=3,
        batch_size=2,
        grad_accum=2,
        buckets=True,
        train_text_encoder=True,
        text_encoder_lr=5e-4,
        min_snr_gamma=5.0,
        noise_offset=0.05,
        caption_dropout=0.3,
        shuffle_tags=True,
        keep_tokens=1,
        random_flip=True,
        lr_scheduler="linear",
        warmup_steps=1,
        targets=["to_q", "to_v", "ff"],
        output_dir=str(tmp_path / "work"),
        no_register=True,
        progress=False,
    )
    result = train(config)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    base = load_base_model("micro")
    adapter = load_adapter(result.data, module_names=base.module_shapes.keys())
    text_keys = [k for k in adapter.modules if k.startswith("text_encoder.")]
    assert text_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text_keys)
    assert any(k.endswith("self_attn.q_proj") for k in text_keys)
    unet_suffixes = {k.rsplit(".", 1)[-1] for k in adapter.modules if k.startswith("unet.")}
    assert unet_suffixes == {"to_q", "to_v", "proj", "2"}  # ff.net.0.proj and ff.net.2
    assert any(torch.count_nonzero(m.up) for k, m in adapter.modules.items() if k in text_keys)
    meta = adapter.metadata
    assert meta["ss_enable_bucket"] == "True"
    buckets = json.loads(meta["ss_bucket_info"])["buckets"].values()  # kohya's layout
    assert {"resolution": [24, 40], "count": 2} in buckets
    assert meta["ss_gradient_accumulation_steps"] == "2" and meta["ss_min_snr_gamma"] == "5.0"
    assert meta["ss_network_train_unet_only"] == "False" and meta["ss_text_encoder_lr"] == "0.0005"


def test_unknown_target_is_a_clear_error(tmp_path, shapes_dir):
    from adapters.errors import InvalidArgument

    config = TrainConfig(data_dir=str(shapes_dir), base="micro", targets=["nonexistent_layer"], steps=1,
                         output_dir=str(tmp_path), no_register=True, progress=False)  # fmt: skip
    with pytest.raises(InvalidArgument, match="nonexistent_layer"):
        train(config)
