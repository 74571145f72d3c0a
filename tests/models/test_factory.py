"""The tiny-model factory is deterministic and has SD 1.x topology."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.models.factory import SPECS, build_pipeline


def _state(pipeline) -> dict[str, torch.Tensor]:
    out = {}
    for component in ("unet", "vae", "text_encoder"):
        for key, value in getattr(pipeline, component).state_dict().items():
            out[f"{component}.{key}"] = value
    return out


def _image(pipeline, seed: int = 0, steps: int = 3) -> np.ndarray:
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    generator = torch.Generator().manual_seed(seed)
    result = pipeline(
        "a red circle",
        num_inference_steps=steps,
        height=size,
        width=size,
        generator=generator,
        output_type="np",
    )
    return result.images[0]


@pytest.mark.parametrize("size", ["micro", "tiny"])
def test_two_builds_are_bit_identical(size):
    first, second = _state(build_pipeline(size, seed=0)), _state(build_pipeline(size, seed=0))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_seed_changes_weights():
    first, second = _state(build_pipeline("micro", seed=0)), _state(build_pipeline("micro", seed=1))
    assert any(not torch.equal(first[key], second[key]) for key in first)


def test_same_seed_same_image(micro_pipeline):
    assert np.array_equal(_image(micro_pipeline, seed=7), _image(micro_pipeline, seed=7))
    assert not np.array_equal(_image(micro_pipeline, seed=7), _image(micro_pipeline, seed=8))


def test_topology(tiny_pipeline):
    spec = SPECS["tiny"]
    assert tuple(tiny_pipeline.unet.config.block_out_channels) == spec.unet_channels
    assert tiny_pipeline.unet.config.cross_attention_dim == tiny_pipeline.text_encoder.config.hidden_size
    assert tiny_pipeline.scheduler.config.algorithm_type == "dpmsolver++"
    assert tiny_pipeline.vae_scale_factor == spec.vae_scale_factor
    image = _image(tiny_pipeline, steps=2)
    assert image.shape == (64, 64, 3)


def test_unknown_size_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown factory size 'huge'"):
        build_pipeline("huge")
