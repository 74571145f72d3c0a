"""ONNX Runtime backend: same image as torch under the same blend; swaps leak nothing, re-bind nothing."""

from __future__ import annotations

import numpy as np
import pytest

from server.backends.onnxruntime_backend import OrtUnet, with_unet
from server.engine.denoise import denoise
from server.engine.fuse import FusedWeights
from server.engine.types import GenerationSettings
from server.models.shapes import lora_targets

from .conftest import unet_adapters

IMAGE_TOLERANCE = 2e-3  # max abs difference of float images in [0, 1] after 4 steps (float32 kernel order)
JOB = GenerationSettings(
    prompt="a red square",
    negative_prompt="",
    width=64,
    height=64,
    steps=4,
    guidance_scale=5.0,
    seed=7,
    sampler="euler",
    num_images=1,
)


def _plans(pipeline, fused):
    prepared = {
        name: fused.prepare(adapter, name=name, version=1, sha256=name * 8)
        for name, adapter in unet_adapters(pipeline).items()
    }
    return {
        "a": fused.plan([(prepared["a"], 1.0)]),
        "b": fused.plan([(prepared["b"], 0.8)]),
        "ab": fused.plan([(prepared["a"], 0.6), (prepared["b"], -0.5)]),
    }


@pytest.fixture()
def backend(own_tiny, export_folder):
    return OrtUnet(own_tiny, "tiny-fp", threads=1, folder=export_folder)


def test_image_matches_torch_under_a_blend(own_tiny, backend):
    fused = FusedWeights(lora_targets(own_tiny))
    plans = _plans(own_tiny, fused)
    view = with_unet(own_tiny, backend)
    for name in ("ab", None):
        plan = plans[name] if name else None
        fused.apply(plan)
        backend.apply(plan)
        expected = denoise(own_tiny, JOB, output_type="np").images[0]
        got = denoise(view, JOB, output_type="np").images[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < IMAGE_TOLERANCE, name
    # The blend changes the image: the comparison above is not vacuous.
    backend.apply(plans["ab"])
    blended = denoise(view, JOB, output_type="np").images[0]
    assert np.abs(blended - got).max() > 10 * IMAGE_TOLERANCE


def test_a_b_a_leaks_nothing_and_keeps_bindings(own_tiny, backend):
    fused = FusedWeights(lora_targets(own_tiny))
    plans = _plans(own_tiny, fused)
    base = {key: backend.buffer(key).copy() for key in backend.weight_keys}
    addresses = {key: backend.buffer(key).ctypes.data for key in backend.weight_keys}
    session = backend.session

    backend.apply(plans["a"])
    after_a = {key: backend.buffer(key).copy() for key in backend.weight_keys}
    assert any(not np.array_equal(after_a[k], base[k]) for k in base)
    backend.apply(plans["b"])
    backend.apply(plans["a"])
    for key in backend.weight_keys:
        assert np.array_equal(backend.buffer(key), after_a[key]), key
    backend.apply(None)
    for key in backend.weight_keys:
        assert np.array_equal(backend.buffer(key), base[key]), key
    assert backend.session is session
    assert {key: backend.buffer(key).ctypes.data for key in backend.weight_keys} == addresses


def test_swap_reaches_the_session(own_tiny, backend):
    """A write into the bound buffers changes the next forward (the binding aliases them)."""
    import torch

    from server.backends.onnx_export import example_inputs

    fused = FusedWeights(lora_targets(own_tiny))
    plans = _plans(own_tiny, fused)
    sample, timestep, hidden = example_inputs(own_tiny.unet, batch=1)
    before = backend(sample, timestep, encoder_hidden_states=hidden)[0]
    backend.apply(plans["a"])
    fused.apply(plans["a"])
    after = backend(sample, timestep, encoder_hidden_states=hidden)[0]
    with torch.no_grad():
        expected = own_tiny.unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]
    assert (after - before).abs().max() > 1e-3
    assert (after - expected).abs().max() < 1e-4


def test_a_prompt_of_several_chunks_runs_as_on_torch(own_tiny, backend):
    """The exported UNet takes any token count: A1111-style long prompts are 77 tokens per chunk."""
    import dataclasses

    long = dataclasses.replace(JOB, prompt=" ".join(["a red square with a thin blue border"] * 12))
    view = with_unet(own_tiny, backend)
    expected = denoise(own_tiny, long, output_type="np").images[0]
    got = denoise(view, long, output_type="np").images[0]
    assert np.abs(got - expected).max() < IMAGE_TOLERANCE
