"""The backends on the tiny SDXL: added conditioning into the UNet, both text encoders on OpenVINO.

The engine on OpenVINO (fp32, bf16) and ONNX Runtime draws the torch engine's images under
blends that touch the UNet and both text encoders; the stand-ins answer what the SDXL family's
``encode`` reads; swaps A -> B -> A are bit-exact on the weight buffers.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("openvino")

from server.backends.onnx_export import (
    TEXT_EMBEDS,
    TIME_IDS,
    ExportSettings,
    added_inputs,
    example_added,
    example_inputs,
    export_key,
    export_unet,
    unet_targets,
)
from server.backends.openvino_backend import FULL, LEAN, OvUnet, slot_bytes
from server.backends.openvino_runtime import cpu_supports_bf16
from server.backends.openvino_text import OvTextEncoder
from server.backends.pipeline_view import with_components
from server.backends.tensorrt_backend import BuildSettings, plan_cache_key
from server.engine import Engine, MemoryResolver
from server.engine.fuse import FusedWeights
from server.engine.types import GenerateRequest
from server.models.families import SDXL, family_of
from server.models.shapes import lora_targets
from tests.engine.conftest import base_from, engine_on, make_adapters

# Of 255, max over the image (4 steps), as the SD 1.x OpenVINO tests and the README state them.
FP32_TOLERANCE = 2  # measured 0-1
BF16_TOLERANCE = 12  # measured 11 (mean 1.17-1.25)
BF16_MEAN_TOLERANCE = 2.0
ORT_TOLERANCE = 2  # measured 0-1
FORWARD_TOLERANCE = 1e-4  # float32 UNet / encoder outputs of magnitude ~1 (kernel order)
NO_BF16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native BF16")
ENCODERS = ("text_encoder", "text_encoder_2")
pytestmark = pytest.mark.usefixtures("in_ov_home")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_pipeline):
    """A private copy of the tiny SDXL for the forward tests (their torch reference is swapped)."""
    own = copy.deepcopy(tiny_sdxl_pipeline)
    for component in family_of(own).weight_components:
        getattr(own, component).requires_grad_(False).eval()
    return own


@pytest.fixture(scope="module")
def fingerprint(tiny_sdxl_pipeline) -> str:
    """The engine's key for the tiny SDXL, so backends built here share its exports."""
    return base_from(tiny_sdxl_pipeline).fingerprint


@pytest.fixture(scope="module")
def plans(sdxl):
    """Blends over the UNet and both text encoders: ``a`` (attention and linear layers), ``b``
    (also 3x3 convolutions: the full UNet variant), and ``ab`` of both."""
    fused = FusedWeights(lora_targets(sdxl))
    adapters = make_adapters(sdxl, count=2)
    prepared = {
        name: fused.prepare(adapter, name=name, version=1, sha256=name * 8)
        for name, adapter in zip("ab", adapters.values(), strict=True)
    }
    return {
        "a": fused.plan([(prepared["a"], 1.0)]),
        "b": fused.plan([(prepared["b"], 0.8)]),
        "ab": fused.plan([(prepared["a"], 0.6), (prepared["b"], -0.5)]),
    }


def _buffers(part) -> dict[str, torch.Tensor]:
    return {key: part.buffer(key).clone() for key in part.weight_keys}


def _same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _engine(pipeline, backend: str, precision: str = "fp32") -> Engine:
    """An engine with ``ink`` and ``clay``: attention layers of the UNet and of both text encoders (the
    lean UNet variant; the full one, for 3x3 convolutions, is checked on the UNet alone)."""
    resolver = MemoryResolver()
    adapters = make_adapters(pipeline, count=3)
    for name in ("ink", "clay"):
        resolver.add_adapter(name, adapters[name])
    return engine_on(base_from(pipeline), backend, precision, resolver=resolver)


def _image(engine: Engine, adapters) -> np.ndarray:
    request = GenerateRequest(prompt="a red square", steps=4, seed=5, adapters=list(adapters))
    return np.asarray(engine.generate(request).images[0], dtype=np.int16)


def _blends_match(reference: Engine, engine: Engine, close) -> dict[tuple, list[np.ndarray]]:
    images: dict[tuple, list[np.ndarray]] = {}
    for blend in ([("ink", 1.0)], [("clay", 0.8), ("ink", -0.4)], [], [("ink", 1.0)]):
        expected, got = _image(reference, blend), _image(engine, blend)
        assert close(np.abs(got - expected)), blend
        images.setdefault(tuple(blend), []).append(got)
    # A -> B -> base -> A: A's image again, and the blend changes the image visibly.
    first, again = images[(("ink", 1.0),)]
    assert np.array_equal(first, again)
    assert np.abs(first - images[()][0]).max() > 10 * FP32_TOLERANCE
    return images


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=NO_BF16)])
def test_openvino_engine_gives_the_torch_engine_images(tiny_sdxl_pipeline, precision):
    reference = _engine(tiny_sdxl_pipeline, "torch")
    engine = _engine(tiny_sdxl_pipeline, "openvino", precision)
    backend = engine._backend
    assert engine.backend_name == f"openvino ({precision})"
    assert {part.component for part in (backend.text_encoder, backend.text_encoder_2)} == set(ENCODERS)
    assert backend.owns("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj")
    assert backend.vae.config.scaling_factor == tiny_sdxl_pipeline.vae.config.scaling_factor != 0.18215
    if precision == "fp32":
        _blends_match(reference, engine, lambda diff: diff.max() <= FP32_TOLERANCE)
    else:
        _blends_match(
            reference,
            engine,
            lambda diff: diff.max() <= BF16_TOLERANCE and diff.mean() <= BF16_MEAN_TOLERANCE,
        )
    assert [shape[0] for shape in backend.unet.compiled_shapes] == [LEAN]
    # The torch modules the backend replaces are never written: every key went to the backend
    # (at bf16 they hold the backend's bf16 W0, their float32 weights freed).
    for component in ("unet", *ENCODERS):
        pristine = dict(getattr(tiny_sdxl_pipeline, component).named_parameters())
        for name, parameter in getattr(engine.pipeline, component).named_parameters():
            assert torch.equal(parameter, pristine[name].to(parameter.dtype)), (component, name)


@pytest.mark.slow
def test_onnxruntime_engine_gives_the_torch_engine_images(tiny_sdxl_pipeline):
    reference = _engine(tiny_sdxl_pipeline, "torch")
    engine = _engine(tiny_sdxl_pipeline, "onnxruntime")
    assert engine._backend.unet.exported.added_inputs == (TEXT_EMBEDS, TIME_IDS)
    _blends_match(reference, engine, lambda diff: diff.max() <= ORT_TOLERANCE)


def test_unet_takes_the_added_conditioning_and_swaps_exactly(sdxl, fingerprint, plans):
    fused = FusedWeights(lora_targets(sdxl))
    unet = OvUnet(sdxl, fingerprint, precision="fp32", threads=1, slots=1)
    fresh = OvUnet(sdxl, fingerprint, precision="fp32", threads=1, slots=1)
    sample, timestep, hidden = example_inputs(sdxl.unet, batch=2)
    added = example_added(sdxl.unet, batch=2)

    def run(backend) -> torch.Tensor:
        return backend(sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added)[0]

    base, base_out = _buffers(unet), run(unet)
    for name in ("ab", None):
        plan = plans[name] if name else None
        fused.apply(plan)
        unet.apply(plan)
        with torch.no_grad():
            expected = sdxl.unet(
                sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False
            )[0]
        assert (run(unet) - expected).abs().max() < FORWARD_TOLERANCE, name
    assert [shape[0] for shape in unet.compiled_shapes] == [LEAN, FULL]  # ab touches 3x3 convolutions
    # The added inputs reach the graph: other time ids, another prediction.
    other = {**added, TIME_IDS: added[TIME_IDS] * 2}
    moved = unet(sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs=other)[0]
    assert (moved - base_out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="added_cond_kwargs with text_embeds, time_ids"):
        unet(sample, timestep, encoder_hidden_states=hidden)
    # A -> B -> A: B's buffers equal a fresh B's; A's again bit for bit; base exactly the base.
    unet.apply(plans["a"])
    after_a = _buffers(unet)
    unet.apply(plans["b"])
    fresh.apply(plans["b"])
    assert _same(_buffers(unet), _buffers(fresh))
    unet.apply(plans["a"])
    assert _same(_buffers(unet), after_a)
    unet.apply(None)
    assert _same(_buffers(unet), base)
    assert torch.equal(run(unet), base_out)
    # Slots are sized by their real bytes; under a usual blend a slot holds no bias (biases are
    # lazy, read from W0), only weights, so bf16 is exactly half of float32.
    assert slot_bytes(sdxl, "fp32") == unet.weights.nbytes
    assert 2 * slot_bytes(sdxl, "bf16") == slot_bytes(sdxl, "fp32")


@pytest.mark.parametrize("component", ENCODERS)
def test_text_encoders_answer_what_the_family_reads_and_swap_exactly(sdxl, fingerprint, plans, component):
    fused = FusedWeights(lora_targets(sdxl))
    encoder = OvTextEncoder(sdxl, fingerprint, component=component, threads=1)
    torch_encoder = getattr(sdxl, component)
    ids = sdxl.tokenizer(["a red square"], padding="max_length", return_tensors="pt").input_ids
    assert encoder.dtype == torch.float32 and encoder.config is torch_encoder.config
    assert all(key.startswith(f"{component}.") for key in encoder.weight_keys)
    base = _buffers(encoder)
    for name in ("ab", None):
        plan = plans[name] if name else None
        fused.apply(plan)
        encoder.apply(plan)
        got = encoder(ids, output_hidden_states=True)
        with torch.no_grad():
            expected = torch_encoder(ids, output_hidden_states=True)
        assert got[0].shape == expected[0].shape  # encoder 2: the pooled projection, 2-D
        assert (got[0] - expected[0]).abs().max() < FORWARD_TOLERANCE, name
        assert len(got.hidden_states) == len(expected.hidden_states)
        for index in (-3, -2, -1, 0):  # -2: what SDXL reads; -3: with a clip skip of 2
            assert (got.hidden_states[index] - expected.hidden_states[index]).abs().max() < FORWARD_TOLERANCE
    assert encoder(ids).hidden_states is None and len(encoder(ids)) == 1
    encoder.apply(plans["a"])
    after_a = _buffers(encoder)
    assert not _same(after_a, base)
    encoder.apply(plans["b"])
    encoder.apply(plans["a"])
    assert _same(_buffers(encoder), after_a)
    encoder.apply(None)
    assert _same(_buffers(encoder), base)


def test_the_family_encodes_through_the_stand_ins_as_through_torch(sdxl, fingerprint):
    encoders = {
        component: OvTextEncoder(sdxl, fingerprint, component=component, threads=1) for component in ENCODERS
    }
    view = with_components(sdxl, **encoders)
    assert family_of(view) is SDXL
    size = {"height": 64, "width": 48, "negative": False}
    got, expected = SDXL.encode(view, "a red square", **size), SDXL.encode(sdxl, "a red square", **size)
    for field in ("embeds", "pooled", "time_ids"):
        assert (getattr(got, field) - getattr(expected, field)).abs().max() < FORWARD_TOLERANCE, field


def test_sdxl_graphs_have_their_own_inputs_and_cache_keys(sdxl, fingerprint, tiny_pipeline):
    exported = export_unet(sdxl, fingerprint, ExportSettings(weights="inputs"))
    graph = onnx.load(str(exported.path), load_external_data=False).graph
    dims = {
        i.name: tuple(d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim) for i in graph.input
    }
    assert dims[TEXT_EMBEDS] == ("batch", 32) and dims[TIME_IDS] == ("batch", 6)
    assert set(unet_targets(sdxl)) <= set(dims)  # every weight still a named input
    assert added_inputs(sdxl.unet.config) == (TEXT_EMBEDS, TIME_IDS)
    assert added_inputs(tiny_pipeline.unet.config) == ()
    settings = ExportSettings(weights="initializers")
    assert export_key("fp", settings) != export_key("fp", settings, (TEXT_EMBEDS, TIME_IDS))
    build = BuildSettings()
    assert plan_cache_key("fp", settings, build, "10", "gpu") != plan_cache_key(
        "fp", settings, build, "10", "gpu", (TEXT_EMBEDS, TIME_IDS)
    )
    paths = {OvTextEncoder(sdxl, fingerprint, component=c, threads=1).path for c in ENCODERS}
    assert len(paths) == 2


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs tensorrt")
def test_tensorrt_takes_the_added_conditioning(sdxl, plans, tmp_path):
    from server.backends.tensorrt_backend import TensorRTUnet

    own = copy.deepcopy(sdxl)
    fused = FusedWeights(lora_targets(own))
    trt_unet = TensorRTUnet(own, "tiny-sdxl-fp", BuildSettings(fp16=False), folder=tmp_path)
    sample, timestep, hidden = example_inputs(own.unet, batch=2)
    added = example_added(own.unet, batch=2)
    fused.apply(plans["a"])
    trt_unet.apply(plans["a"])
    with torch.no_grad():
        expected = own.unet(
            sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False
        )[0]
    first = trt_unet(sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added)[0].cpu()
    assert (first - expected).abs().max() < 1e-2
    trt_unet.apply(plans["b"])
    trt_unet.apply(plans["a"])
    again = trt_unet(sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added)[0].cpu()
    assert (again - first).abs().max() < 1e-5
