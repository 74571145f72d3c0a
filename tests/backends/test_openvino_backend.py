"""OpenVINO backend: the torch engine's images; swaps write in place, leak nothing, recompile nothing."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from adapters.errors import InvalidArgument
from server.backends.onnx_export import example_inputs
from server.backends.openvino_backend import FULL, LEAN, OvUnet
from server.backends.openvino_runtime import cpu_supports_bf16, effective_precision
from server.backends.openvino_text import OvTextEncoder
from server.backends.openvino_vae import OvVaeDecoder
from server.engine import Engine, MemoryResolver
from server.engine.fuse import FusedWeights
from server.engine.synthetic import random_adapter
from server.engine.types import GenerateRequest
from server.models.shapes import lora_targets, module_shapes
from tests.engine.conftest import base_from, engine_on

from .conftest import unet_adapters

FP32_TOLERANCE = 2  # of 255, max over the image: float32 kernel order only (measured 0-1)
BF16_TOLERANCE = 12  # of 255, max over the image after 4 steps (measured 5-7 on tiny)
BF16_MEAN_TOLERANCE = 2.0  # of 255, mean over the image (measured 0.8-1.2)
NO_BF16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native BF16")
PRECISIONS = ["fp32", pytest.param("bf16", marks=NO_BF16)]
pytestmark = pytest.mark.usefixtures("in_ov_home")


@pytest.fixture(scope="module")
def fingerprint(tiny_pipeline) -> str:
    """The engine's key for the tiny model, so backends built here share its caches."""
    return base_from(tiny_pipeline).fingerprint


def _text_adapter(pipeline):
    shapes = {key: shape for key, shape in module_shapes(pipeline).items() if key.startswith("text_encoder.")}
    return random_adapter(shapes, seed=4, rank=4, strength=0.5)


def _engine(pipeline, backend="openvino", precision="fp32") -> Engine:
    resolver = MemoryResolver()
    for name, adapter in {**unet_adapters(pipeline), "t": _text_adapter(pipeline)}.items():
        resolver.add_adapter(name, adapter)
    return engine_on(base_from(pipeline), backend, precision, resolver=resolver)


def _image(engine: Engine, adapters, **size) -> np.ndarray:
    request = GenerateRequest(prompt="a red square", steps=4, seed=5, adapters=list(adapters), **size)
    return np.asarray(engine.generate(request).images[0], dtype=np.int16)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_engine_gives_the_torch_engine_images(tiny_pipeline, precision):
    reference = _engine(tiny_pipeline, backend="torch")
    engine = _engine(tiny_pipeline, precision=precision)
    assert engine.backend_name == f"openvino ({precision})"
    images = {}
    for blend in ([("a", 1.0)], [("b", 0.8), ("t", 1.0)], [], [("a", 1.0)]):
        expected, got = _image(reference, blend), _image(engine, blend)
        diff = np.abs(got - expected)
        if precision == "fp32":
            assert diff.max() <= FP32_TOLERANCE, blend
        else:
            assert diff.max() <= BF16_TOLERANCE and diff.mean() <= BF16_MEAN_TOLERANCE, blend
        images.setdefault(tuple(blend), []).append(got)
    # A -> B -> base -> A: A's image again (nothing of B leaked), and the blend changes the image.
    first, again = images[(("a", 1.0),)]
    assert np.array_equal(first, again)
    assert np.abs(first - images[()][0]).max() > 10 * FP32_TOLERANCE
    # The torch modules the backend replaces are never written (at bf16 they hold the backend's
    # bf16 W0, their float32 weights freed).
    for component in ("unet", "text_encoder"):
        pristine = dict(getattr(tiny_pipeline, component).named_parameters())
        for name, parameter in getattr(engine.pipeline, component).named_parameters():
            assert torch.equal(parameter, pristine[name].to(parameter.dtype)), name


def test_other_sizes_compile_once_each(tiny_pipeline):
    reference = _engine(tiny_pipeline, backend="torch")
    engine = _engine(tiny_pipeline)
    size = {"width": 96, "height": 64}
    assert np.abs(_image(engine, [], **size) - _image(reference, [], **size)).max() <= FP32_TOLERANCE
    _image(engine, [], **size)
    _image(engine, [])
    unet = engine._backend.unet
    assert [shape[:2] for shape in unet.compiled_shapes] == [(LEAN, (2, 4, 32, 48)), (LEAN, (2, 4, 32, 32))]
    assert engine._backend.vae.compiled_shapes == ((1, 4, 32, 48), (1, 4, 32, 32))


def _plans(pipeline):
    fused = FusedWeights(lora_targets(pipeline))
    prepared = {
        name: fused.prepare(adapter, name=name, version=1, sha256=name * 8)
        for name, adapter in unet_adapters(pipeline).items()
    }
    return {
        "a": fused.plan([(prepared["a"], 1.0)]),  # attention only: the lean variant
        "b": fused.plan([(prepared["b"], 0.8)]),  # touches 3x3 convolutions: the full variant
        "ab": fused.plan([(prepared["a"], 0.6), (prepared["b"], -0.5)]),
    }


def _weights(unet: OvUnet) -> dict[str, torch.Tensor]:
    return {key: unet.buffer(key).clone() for key in unet.weight_keys}


def _same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_swaps_write_in_place_from_base(own_tiny, fingerprint, precision):
    plans = _plans(own_tiny)
    unet = OvUnet(own_tiny, fingerprint, precision=precision, threads=1, slots=1)
    fresh = OvUnet(own_tiny, fingerprint, precision=precision, threads=1, slots=1)
    assert fresh.exported.cached  # the second backend reuses the export
    sample, timestep, hidden = example_inputs(own_tiny.unet, batch=1)
    base = _weights(unet)
    addresses = {key: unet.buffer(key).data_ptr() for key in unet.weight_keys}

    before = unet(sample, timestep, encoder_hidden_states=hidden)[0]
    requests = {variant: unet.request(variant, sample.shape, hidden.shape) for variant in (LEAN, FULL)}
    unet.apply(plans["a"])
    assert unet.variant == LEAN
    after_a = unet(sample, timestep, encoder_hidden_states=hidden)[0]
    assert (after_a - before).abs().max() > 1e-3  # the write reached the runtime
    unet.apply(plans["b"])
    assert unet.variant == FULL
    after_b = unet(sample, timestep, encoder_hidden_states=hidden)[0]
    fresh.apply(plans["b"])
    assert _same(_weights(unet), _weights(fresh))  # A -> B equals a fresh B, bit for bit
    assert torch.equal(after_b, fresh(sample, timestep, encoder_hidden_states=hidden)[0])
    unet.apply(plans["ab"])
    unet.apply(None)
    assert unet.variant == LEAN
    assert _same(_weights(unet), base)  # back to base: exactly the base
    assert torch.equal(unet(sample, timestep, encoder_hidden_states=hidden)[0], before)
    # Nothing recompiled, no request made, no buffer moved.
    assert {variant: unet.request(variant, sample.shape, hidden.shape) for variant in requests} == requests
    assert len(unet.compiled_shapes) == 2
    assert {key: unet.buffer(key).data_ptr() for key in unet.weight_keys} == addresses


def test_blend_slots_make_switching_back_free_and_stay_exact(own_tiny, fingerprint):
    plans = _plans(own_tiny)
    unet = OvUnet(own_tiny, fingerprint, precision="fp32", threads=1, slots=2)
    fresh = OvUnet(own_tiny, fingerprint, precision="fp32", threads=1, slots=1)
    sample, timestep, hidden = example_inputs(own_tiny.unet, batch=1)

    def run(backend: OvUnet) -> torch.Tensor:
        return backend(sample, timestep, encoder_hidden_states=hidden)[0]

    base = run(unet)
    assert unet.apply(plans["a"]) > 0  # a second slot, written from base
    out_a = run(unet)
    assert unet.apply(plans["ab"]) > 0  # evicts the base's slot
    out_ab = run(unet)
    made = len(unet._requests)
    for _ in range(2):  # A <-> AB alternate: both held, nothing written, no request made
        assert unet.apply(plans["a"]) == 0 and torch.equal(run(unet), out_a)
        assert unet.apply(plans["ab"]) == 0 and torch.equal(run(unet), out_ab)
    assert len(unet._requests) == made
    fresh.apply(plans["ab"])
    assert torch.equal(run(fresh), out_ab)  # a slot rewritten from base holds exactly the blend
    assert unet.apply(None) > 0  # the base evicts A's slot and is restored exactly
    assert torch.equal(run(unet), base)
    assert unet.apply(plans["ab"]) == 0 and torch.equal(run(unet), out_ab)


def test_fp32_forward_matches_torch_under_a_blend(own_tiny, fingerprint):
    plans = _plans(own_tiny)
    fused = FusedWeights(lora_targets(own_tiny))
    unet = OvUnet(own_tiny, fingerprint, precision="fp32", threads=1)
    sample, timestep, hidden = example_inputs(own_tiny.unet, batch=2)
    for name in ("a", "ab", None):
        plan = plans[name] if name else None
        fused.apply(plan)
        unet.apply(plan)
        with torch.no_grad():
            expected = own_tiny.unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]
        got = unet(sample, timestep, encoder_hidden_states=hidden)[0]
        assert (got - expected).abs().max() < 1e-4, name


def test_vae_decoder_matches_torch_and_reuses_its_conversion(own_tiny, fingerprint):
    first = OvVaeDecoder(own_tiny.vae, fingerprint, threads=1)
    stamp = first.path.stat().st_mtime_ns
    second = OvVaeDecoder(own_tiny.vae, fingerprint, threads=1)
    assert second.path == first.path and second.path.stat().st_mtime_ns == stamp
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = own_tiny.vae.decode(latents, return_dict=False)[0]
    assert (second.decode(latents)[0] - expected).abs().max() < 1e-4


def test_text_encoder_swaps_in_place(own_tiny, fingerprint):
    fused = FusedWeights(lora_targets(own_tiny))
    prepared = fused.prepare(_text_adapter(own_tiny), name="t", version=1, sha256="t" * 8)
    plan = fused.plan([(prepared, 0.8)])
    encoder = OvTextEncoder(own_tiny, fingerprint, threads=1)
    ids = own_tiny.tokenizer(["a red square"], padding="max_length", return_tensors="pt").input_ids
    base = encoder(ids)[0]
    for step in (plan, None):
        fused.apply(step)
        encoder.apply(step)
        with torch.no_grad():
            expected = own_tiny.text_encoder(ids)[0]
        assert (encoder(ids)[0] - expected).abs().max() < 1e-4
    assert torch.equal(encoder(ids)[0], base)
    assert len(encoder.compiled_shapes) == 1
    # A clip skip's reads: a hidden state from the end, through the encoder's final layer norm.
    with torch.no_grad():
        expected = own_tiny.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = own_tiny.text_encoder.final_layer_norm(expected)
        got = encoder.final_layer_norm(encoder(ids, output_hidden_states=True).hidden_states[-2])
    assert (got - expected).abs().max() < 1e-4


def test_bad_settings_are_refused_clearly(tiny_pipeline, caplog):
    with pytest.raises(InvalidArgument, match="precision 'fp16' is not supported: use one of fp32, bf16"):
        engine_on(base_from(tiny_pipeline), "openvino", "fp16")
    with pytest.raises(InvalidArgument, match="precision bf16 needs backend openvino"):
        engine_on(base_from(tiny_pipeline), "torch", "bf16")
    with pytest.raises(InvalidArgument, match="runs on the CPU from float32 weights"):
        engine_on(base_from(tiny_pipeline, device="meta"), "openvino")
    with pytest.raises(InvalidArgument, match="runs on the CPU from float32 weights"):
        engine_on(base_from(tiny_pipeline, dtype=torch.bfloat16), "openvino", "bf16")
    with caplog.at_level(logging.WARNING):
        assert effective_precision("bf16", bf16_supported=False) == "fp32"
    assert "no native BF16" in caplog.text
    assert effective_precision("fp32", bf16_supported=False) == "fp32"


def test_a_unet_without_weight_buffers_is_refused(own_tiny, fingerprint):
    with pytest.raises(InvalidArgument, match="at least one weight set"):
        OvUnet(own_tiny, fingerprint, slots=0)


def test_the_engine_keeps_a_second_blend_slot_only_within_its_plan_budget(tiny_pipeline):
    roomy = engine_on(base_from(tiny_pipeline), "openvino", "fp32")
    tight = engine_on(base_from(tiny_pipeline), "openvino", "fp32", plan_cache_bytes=1024)
    assert roomy._backend.unet._slot_count == 2
    assert tight._backend.unet._slot_count == 1
