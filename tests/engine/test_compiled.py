"""Compiled UNet with hot-swap (no recompiles, eager outputs) and the half-precision/CUDA path.

The CPU tests trace with ``aot_eager`` (dynamo's guards and graph capture are
the same for every backend; a micro UNet traces in about 10 s); one slow test
runs inductor itself (C++ kernels: 55-110 s on a busy 2-core machine, about
10 s with a warm inductor cache). CUDA tests are marked ``gpu``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from adapters.errors import FailedPrecondition, InvalidArgument
from server.backends.onnx_export import example_inputs
from server.engine import GenerateRequest
from server.engine.compiled import (
    CompileSettings,
    channels_last_inputs,
    compile_unet,
    graphs_compiled,
    is_compiled,
)
from server.engine.fuse import FusedWeights
from server.models.factory import build_pipeline
from server.models.shapes import lora_targets
from tests.engine.conftest import make_engine

BLENDS = ([("ink", 1.0)], [("neon", 0.7), ("clay", -0.5)], [], [("ink", 1.0)])
# Compiled vs eager UNet output of one blend (float32, micro): measured 0 with aot_eager and
# 1.7e-6 to 2.4e-6 with inductor (which fuses and reorders float ops).
COMPILED_TOLERANCE = 5e-5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts and ends with no compiled code cached (UNet classes share code objects)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def unet_call(unet, inputs, *, eager: bool = False) -> torch.Tensor:
    """One UNet step on fixed inputs; ``eager`` bypasses the compiled call (``forward`` directly)."""
    sample, timestep, hidden = inputs
    run = unet.forward if eager else unet
    with torch.inference_mode():
        return run(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]


def step_inputs(unet, dtype=torch.float32, device="cpu"):
    """Inputs shaped like the denoising loop's: a CFG batch of 2 and a 0-d timestep."""
    sample, timestep, hidden = example_inputs(unet, batch=2)
    return sample.to(device, dtype), timestep[0].to(device), hidden.to(device, dtype)


def check_swaps_do_not_recompile(engine, inputs) -> list[float]:
    """Warm up, then swap through BLENDS with the engine's fused swap; returns max |compiled - eager|."""
    unet = engine.pipeline.unet
    unet_call(unet, inputs)  # compiles
    compiled_graphs = graphs_compiled()
    assert compiled_graphs >= 1
    differences = []
    for blend in BLENDS:
        _, _, swap_ms = engine.activate(blend)
        assert swap_ms > 0.0  # each step of BLENDS really changes the weights
        compiled = unet_call(unet, inputs)
        eager = unet_call(unet, inputs, eager=True)
        differences.append((compiled - eager).abs().max().item())
        assert graphs_compiled() == compiled_graphs, f"swapping to {blend} recompiled the UNet"
    return differences


def test_swaps_through_the_engine_do_not_recompile(micro_pipeline, micro_adapters):
    engine = make_engine(
        micro_pipeline, "micro", micro_adapters, compile=CompileSettings(backend="aot_eager")
    )
    assert is_compiled(engine.pipeline.unet)
    inputs = step_inputs(engine.pipeline.unet)
    base_output = unet_call(engine.pipeline.unet, inputs, eager=True)
    differences = check_swaps_do_not_recompile(engine, inputs)
    assert max(differences) <= COMPILED_TOLERANCE, differences
    # The compiled graph really follows the swaps: blends change its output, and base comes back.
    engine.activate([("ink", 1.0)])
    assert (unet_call(engine.pipeline.unet, inputs) - base_output).abs().max().item() > 1e-3
    engine.activate([])
    assert (unet_call(engine.pipeline.unet, inputs) - base_output).abs().max().item() <= COMPILED_TOLERANCE


def test_compiled_engine_gives_the_eager_engines_images(micro_pipeline, micro_adapters):
    compiled = make_engine(
        micro_pipeline, "micro", micro_adapters, compile=CompileSettings(backend="aot_eager")
    )
    eager = make_engine(micro_pipeline, "micro", micro_adapters)
    compiled.generate(GenerateRequest("warm up", steps=2, seed=0))
    graphs = graphs_compiled()
    for blend in BLENDS:
        request = GenerateRequest("a red boat", steps=3, seed=7, adapters=blend)
        ours, theirs = compiled.generate(request), eager.generate(request)
        difference = np.abs(
            np.asarray(ours.images[0], dtype=np.int16) - np.asarray(theirs.images[0], dtype=np.int16)
        )
        assert difference.max() <= 1, (blend, difference.max())
    assert graphs_compiled() == graphs


@pytest.mark.slow
def test_inductor_reads_swapped_weights_without_recompiling(micro_pipeline, micro_adapters):
    """Inductor with freezing off keeps weights as inputs: its kernels see every blend."""
    engine = make_engine(micro_pipeline, "micro", micro_adapters, compile=True)
    differences = check_swaps_do_not_recompile(engine, step_inputs(engine.pipeline.unet))
    assert max(differences) <= COMPILED_TOLERANCE, differences


def test_compile_refuses_what_would_freeze_weights_or_another_backend(micro_pipeline, micro_adapters):
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True), pytest.raises(FailedPrecondition, match="freezing"):
        make_engine(micro_pipeline, "micro", micro_adapters, compile=True)
    with pytest.raises(InvalidArgument, match="torch backend"):
        from server.engine.compiled import compile_engine_unet

        compile_engine_unet(micro_pipeline, "onnxruntime", True)
    with pytest.raises(InvalidArgument, match="unknown torch.compile backend"):
        compile_unet(copy.deepcopy(micro_pipeline.unet), CompileSettings(backend="nope"))
    options = CompileSettings().options()
    assert options is not None and options["freezing"] is False and options["triton.cudagraphs"] is False


def test_channels_last_inputs_keep_outputs_and_swaps(micro_pipeline, micro_adapters):
    engine = make_engine(micro_pipeline, "micro", micro_adapters)
    unet = engine.pipeline.unet
    inputs = step_inputs(unet)
    engine.activate([("neon", 0.7)])
    plain = unet_call(unet, inputs)
    handle = channels_last_inputs(unet)
    try:
        seen = []
        probe = unet.conv_in.register_forward_pre_hook(
            lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
        channels_last = unet_call(unet, inputs)
        probe.remove()
        assert seen == [True]
        assert (channels_last - plain).abs().max().item() <= 1e-5
        for parameter in unet.parameters():  # weights untouched: blends keep the base's strides
            assert parameter.is_contiguous()
    finally:
        handle.remove()


# ---------------------------------------------------------------- half precision


def test_half_precision_blend_is_computed_in_float32_and_rounded_once(micro_pipeline, micro_adapters):
    half = build_pipeline("micro", seed=0, dtype=torch.float16)
    targets = lora_targets(half)
    fused = FusedWeights(targets)
    pristine = {key: module.weight.detach().clone() for key, module in targets.items()}
    blend = (("neon", 0.7), ("clay", -0.5))
    prepared = [
        (fused.prepare(micro_adapters[name], name=name, version=1, sha256=name * 16), weight)
        for name, weight in blend
    ]
    plan = fused.plan(prepared)
    for materialized in (False, True):
        if materialized:
            fused.materialize(plan)
        fused.apply(None)
        fused.apply(plan)
        worst = 0.0
        for key in plan.updates:
            base = pristine[key].double()
            rows = base.shape[0]
            delta = torch.zeros_like(base.view(rows, -1))
            for name, weight in blend:
                module = micro_adapters[name].modules.get(key)
                if module is not None:
                    up = module.up.reshape(rows, -1).double() * module.scale * weight
                    delta += up @ module.down.reshape(module.rank, -1).double()
            exact = (base.view(rows, -1) + delta).view(base.shape)
            rounded = exact.half()
            ulp = (torch.nextafter(rounded, torch.full_like(rounded, float("inf"))) - rounded).double().abs()
            got = targets[key].weight.double()
            worst = max(worst, ((got - exact).abs() / ulp).max().item())
        # Measured 0.90: float32 products and sum, one rounding to half (fp16 factors gave 41 ulps).
        assert worst <= 1.0, worst
    fused.apply(None)
    for key, module in targets.items():
        assert torch.equal(module.weight, pristine[key])


def test_half_precision_engine_swaps_like_float32(micro_pipeline, micro_adapters):
    """fp16 on the CPU: what a CUDA fp16 engine does, minus the kernels (base restored bit for bit)."""
    half = make_engine(build_pipeline("micro", seed=0, dtype=torch.float16), "micro", micro_adapters)
    full = make_engine(micro_pipeline, "micro", micro_adapters)
    inputs = step_inputs(full.pipeline.unet)
    half_inputs = step_inputs(half.pipeline.unet, torch.float16)
    pristine = {k: m.weight.detach().clone() for k, m in lora_targets(half.pipeline).items()}
    base_full = unet_call(full.pipeline.unet, inputs)
    for blend in ([("ink", 1.0)], [("neon", 0.7), ("clay", -0.5)]):
        half.activate(blend)
        full.activate(blend)
        ours = unet_call(half.pipeline.unet, half_inputs)
        theirs = unet_call(full.pipeline.unet, inputs)
        error = (ours.float() - theirs).abs().max().item()
        effect = (theirs - base_full).abs().max().item()
        # fp16 error stays a small fraction of the blend's own effect (measured: 2.4 % and 0.4 %).
        assert error <= 0.05 * effect, (blend, error, effect)
    half.activate([])
    for key, module in lora_targets(half.pipeline).items():
        assert torch.equal(module.weight, pristine[key]), key


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_half_engine_generates_and_restores_the_base(micro_adapters):
    from server.models.loader import load_base_model

    base = load_base_model("micro", device="cuda", dtype=torch.float16)
    pristine = {k: m.weight.detach().clone() for k, m in lora_targets(base.pipeline).items()}
    engine = make_engine(base.pipeline, "micro", micro_adapters)
    images = {}
    for blend in ([], [("ink", 1.0)], [("neon", 0.7)], []):
        result = engine.generate(GenerateRequest("a red boat", steps=4, seed=3, adapters=blend))
        images.setdefault(str(blend), []).append(np.asarray(result.images[0]))
    assert not np.array_equal(images["[]"][0], images[str([("ink", 1.0)])][0])
    for key, module in lora_targets(engine.pipeline).items():
        assert torch.equal(module.weight, pristine[key].to(module.weight.device)), key


@pytest.mark.gpu
def test_cuda_compiled_half_swaps_do_not_recompile(micro_adapters):
    pipeline = build_pipeline("micro", seed=0, dtype=torch.float16).to("cuda")
    engine = make_engine(pipeline, "micro", micro_adapters, compile=True)
    inputs = step_inputs(engine.pipeline.unet, torch.float16, "cuda")
    differences = check_swaps_do_not_recompile(engine, inputs)
    assert max(differences) <= 2e-2, differences  # fp16 kernels fused differently
