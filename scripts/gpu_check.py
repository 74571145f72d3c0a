"""GPU check: torch CUDA fp32/fp16, the fp16 engine with swaps, torch.compile with swaps, TensorRT refit.

Run on a machine with CUDA (and TensorRT for the refit path):

    python scripts/gpu_check.py [--model tiny] [--steps 20] [--gen-steps 20]
    python scripts/gpu_check.py --cpu     # dry run of every section on the CPU (micro model)

Sections, each a few lines of output, then a one-line summary:

- unet: per-step UNet latency fp32 and fp16, the fused swap time, and the max
  difference of the fp16 UNet output from fp32 under one blend;
- engine: the fp16 engine generating base, A, B, A+B, base with the fused
  swap (swap ms, per-step ms, image difference from the fp32 engine); the base
  weights must be bit-identical to a fresh load after the swaps;
- channels_last: fp16 UNet step with channels_last latents vs contiguous;
- compiled: ``Engine(compile=True)`` in fp16: graphs compiled by the first
  request, none by the swaps after it, per-step ms vs eager, and the image
  difference from the eager engine for each blend;
- tensorrt (if installed): build, refit times, difference after A -> B -> A;
- w0_on_host: VRAM with ``W0`` on the device (blends repointed, kept computed) and with it
  in pinned host memory (``--w0-on-host``: blends written in place), on ``--w0-model``
  (default ``small``) in fp16 through base, A, B, A+B, base: model and peak allocated MiB,
  swap ms, and the images of both modes against each other;
- sdxl: the tiny SDXL (``--sdxl-model``): the fp16 engine, its ``force_upcast`` VAE kept
  in fp32, through base, A, B, A+B, base (blends over the UNet and both text encoders)
  against the fp32 engine; then its TensorRT UNet (with SDXL's ``text_embeds`` and
  ``time_ids`` inputs) if installed.

Exits 1 if a check fails (a tolerance, a recompile, a leaked weight), 2 if
there is no CUDA device (without ``--cpu``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.backends.onnx_export import example_added, example_inputs
from server.engine import Engine, GenerateRequest, MemoryResolver
from server.engine.compiled import CompileSettings, channels_last_inputs, graphs_compiled
from server.engine.fuse import FusedWeights
from server.engine.synthetic import random_adapter
from server.models.loader import load_base_model
from server.models.shapes import lora_targets

FP16_TOLERANCE = 5e-2  # fp16 vs fp32 UNet output, max abs
TRT_TOLERANCE = 1e-2
COMPILED_FP16_TOLERANCE = 2e-2  # compiled vs eager fp16 UNet output, max abs
IMAGE_MEAN_TOLERANCE = 2.0  # fp16 vs reference image, mean abs of 0..255 (tiny on CPU, 20 steps: 0.07)
BLENDS: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = (
    ("base", ()),
    ("A", (("a", 1.0),)),
    ("B", (("b", 0.8),)),
    ("A+B", (("a", 0.6), ("b", 0.5))),
    ("base", ()),
)


@dataclass
class Report:
    """Lines to print at the end and whether any check failed."""

    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)
            self.say(f"  FAIL: {what}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_ms(call: Callable[[], Any], repeats: int, device: torch.device) -> float:
    call()
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    _sync(device)
    return (time.perf_counter() - started) / repeats * 1000.0


def _unet_inputs(unet, device: torch.device) -> tuple:
    """Example UNet inputs on ``device``: sample, timestep, hidden states, added conditioning (SDXL)."""
    sample, timestep, hidden = example_inputs(unet, batch=2)
    added = {name: tensor.to(device) for name, tensor in example_added(unet, batch=2).items()}
    return sample.to(device), timestep[0].to(device), hidden.to(device), added


def _unet_step(unet, inputs, dtype: torch.dtype) -> torch.Tensor:
    sample, timestep, hidden, added = inputs
    extra = {"added_cond_kwargs": {name: t.to(dtype) for name, t in added.items()}} if added else {}
    with torch.inference_mode():
        return unet(
            sample.to(dtype), timestep, encoder_hidden_states=hidden.to(dtype), return_dict=False, **extra
        )[0]


def _adapters(pipeline) -> dict[str, Any]:
    shapes = {k: tuple(m.weight.shape) for k, m in lora_targets(pipeline).items()}
    convs = sorted(k for k, s in shapes.items() if len(s) == 4 and k.startswith("unet.down"))[:4]
    a = random_adapter(shapes, seed=1, rank=8, strength=0.3)
    b = random_adapter(shapes, seed=2, rank=16, strength=0.3)
    conv = random_adapter(shapes, seed=3, rank=4, strength=0.3, targets=convs)  # LoCon part of B
    from adapters.canonical import LoraAdapter

    return {"a": a, "b": LoraAdapter(modules={**b.modules, **conv.modules})}


def _plans(pipeline, adapters) -> tuple[FusedWeights, Any, Any]:
    """The torch fused path over ``pipeline`` and its plans for A and B (0.7)."""
    fused = FusedWeights(lora_targets(pipeline))
    prepared = {n: fused.prepare(a, name=n, version=1, sha256=n * 64) for n, a in adapters.items()}
    return fused, fused.plan([(prepared["a"], 1.0)]), fused.plan([(prepared["b"], 0.7)])


def _engine(
    args,
    dtype: torch.dtype,
    compile: bool | CompileSettings = False,
    model: str | None = None,
    w0_on_host: bool = False,
) -> Engine:
    base = load_base_model(model or args.model, device=args.device, dtype=dtype)
    resolver = MemoryResolver()
    for name, adapter in _adapters(base.pipeline).items():
        resolver.add_adapter(name, adapter)
    return Engine(base, resolver=resolver, compile=compile, w0_on_host=w0_on_host)


def _image_diff(first, second) -> tuple[float, int]:
    a = np.asarray(first, dtype=np.int16)
    b = np.asarray(second, dtype=np.int16)
    difference = np.abs(a - b)
    return float(difference.mean()), int(difference.max())


def _generate(engine: Engine, adapters, args) -> Any:
    request = GenerateRequest(
        "a red house by a lake", steps=args.gen_steps, seed=5, guidance_scale=5.0, adapters=list(adapters)
    )
    return engine.generate(request)


# ---------------------------------------------------------------- sections


def check_unet(args, report: Report) -> None:
    """UNet step fp32/fp16 and the fused swap, outside the engine."""
    device = torch.device(args.device)
    pipeline = load_base_model(args.model, device=device).pipeline
    adapters = _adapters(pipeline)
    fused, plan_a, plan_b = _plans(pipeline, adapters)
    inputs = _unet_inputs(pipeline.unet, device)

    fused.apply(plan_a)
    reference = _unet_step(pipeline.unet, inputs, torch.float32).float()
    step = _time_ms(lambda: _unet_step(pipeline.unet, inputs, torch.float32), args.steps, device)
    started = time.perf_counter()
    for plan in (plan_b, plan_a) * 2:
        fused.apply(plan)
    _sync(device)
    swap = (time.perf_counter() - started) / 4 * 1000
    report.say(f"unet fp32: step {step:.2f} ms, fused swap (scratch path) {swap:.2f} ms")

    half = load_base_model(args.model, device=device, dtype=torch.float16).pipeline
    half_fused = FusedWeights(lora_targets(half))
    half_plan = half_fused.plan(
        [(half_fused.prepare(adapters["a"], name="a", version=1, sha256="a" * 64), 1.0)]
    )
    half_fused.apply(half_plan)
    diff = (_unet_step(half.unet, inputs, torch.float16).float() - reference).abs().max().item()
    step = _time_ms(lambda: _unet_step(half.unet, inputs, torch.float16), args.steps, device)
    report.say(f"unet fp16: step {step:.2f} ms, max diff from fp32 under A {diff:.2e}")
    report.check(diff <= FP16_TOLERANCE, f"fp16 UNet differs from fp32 by {diff:.2e} > {FP16_TOLERANCE}")
    if args.model_trt:
        fused.apply(None)  # TensorRT takes the module weights as its pristine base: the base's
        check_tensorrt(args.model, pipeline, (plan_a, plan_b), inputs, reference, report, args)


def check_engine(args, report: Report) -> dict[str, Any]:
    """The fp16 engine through base, A, B, A+B, base; returns its images for the compiled section."""
    full, half = _engine(args, torch.float32), _engine(args, torch.float16)
    return _compare_engines(args, report, "engine fp16", half, full)


def _compare_engines(args, report: Report, title: str, half: Engine, full: Engine) -> dict[str, Any]:
    """``half`` against ``full`` through ``BLENDS``; the half engine's base weights must come back
    bit for bit. Returns the half engine's images by blend label."""
    pristine = {k: m.weight.detach().clone() for k, m in lora_targets(half.pipeline).items()}
    images: dict[str, Any] = {}
    first_base = None
    for label, blend in BLENDS:
        ours, theirs = _generate(half, blend, args), _generate(full, blend, args)
        mean, worst = _image_diff(ours.images[0], theirs.images[0])
        step, step_fp32 = (r.timings.denoise_ms / args.gen_steps for r in (ours, theirs))
        report.say(
            f"{title} {label:<4}: swap {ours.timings.swap_ms:6.2f} ms, step {step:6.2f} ms "
            f"(fp32 {step_fp32:6.2f}), image vs fp32 mean {mean:.2f} max {worst}"
        )
        report.check(mean <= IMAGE_MEAN_TOLERANCE, f"{title} {label} image mean diff {mean:.2f}/255")
        images[label] = ours.images[0]
        if label == "base":
            if first_base is None:
                first_base = ours.images[0]
            else:
                same = np.array_equal(np.asarray(first_base), np.asarray(ours.images[0]))
                report.say(f"{title} base image after A, B, A+B identical to the first: {same}")
    leaked = [k for k, m in lora_targets(half.pipeline).items() if not torch.equal(m.weight, pristine[k])]
    report.check(not leaked, f"{title}: {len(leaked)} weights differ from the base after the swaps")
    return images


def check_channels_last(args, report: Report) -> None:
    """fp16 UNet step with channels_last latents vs contiguous, timed in alternation."""
    device = torch.device(args.device)
    unet = load_base_model(args.model, device=device, dtype=torch.float16).pipeline.unet
    inputs = _unet_inputs(unet, device)
    plain_ms, last_ms = [], []
    reference = _unet_step(unet, inputs, torch.float16)
    for _ in range(3):
        plain_ms.append(_time_ms(lambda: _unet_step(unet, inputs, torch.float16), args.steps, device))
        handle = channels_last_inputs(unet)
        last_ms.append(_time_ms(lambda: _unet_step(unet, inputs, torch.float16), args.steps, device))
        output = _unet_step(unet, inputs, torch.float16)
        handle.remove()
    diff = (output.float() - reference.float()).abs().max().item()
    report.say(
        f"channels_last fp16: step {min(last_ms):.2f} ms vs contiguous {min(plain_ms):.2f} ms "
        f"(x{min(plain_ms) / min(last_ms):.2f} faster), max diff {diff:.2e}"
    )
    report.check(diff <= COMPILED_FP16_TOLERANCE, f"channels_last output differs by {diff:.2e}")


def check_compiled(args, report: Report, eager_images: dict[str, Any]) -> None:
    """Engine(compile=...) in fp16: no graph compiled by a swap; images as the eager engine's."""
    settings = CompileSettings(backend=args.compile_backend)
    engine = _engine(args, torch.float16, compile=settings)
    started = time.perf_counter()
    before = graphs_compiled()
    first = _generate(engine, (), args)
    warm_s = time.perf_counter() - started
    compiled_graphs = graphs_compiled() - before
    report.say(f"compiled ({args.compile_backend}): first request {warm_s:.1f} s, {compiled_graphs} graph(s)")
    report.check(compiled_graphs >= 1, "the first request compiled nothing: the UNet is not compiled")
    eager_mean, _ = _image_diff(first.images[0], eager_images["base"])
    for label, blend in BLENDS:
        graphs = graphs_compiled()
        result = _generate(engine, blend, args)
        mean, worst = _image_diff(result.images[0], eager_images[label])
        step = result.timings.denoise_ms / args.gen_steps
        report.say(
            f"compiled {label:<4}: swap {result.timings.swap_ms:6.2f} ms, step {step:6.2f} ms, "
            f"image vs eager fp16 mean {mean:.2f} max {worst}, new graphs {graphs_compiled() - graphs}"
        )
        report.check(graphs_compiled() == graphs, f"swapping to {label} recompiled the UNet")
        report.check(mean <= IMAGE_MEAN_TOLERANCE, f"compiled {label} image mean diff {mean:.2f}/255")
    report.say(f"compiled first base image vs eager fp16: mean diff {eager_mean:.2f}")


def _allocated(device: torch.device) -> tuple[int, int]:
    """(allocated, peak allocated) bytes on a GPU; zeros on the CPU."""
    if device.type != "cuda":
        return 0, 0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)


def check_w0_on_host(args, report: Report) -> None:
    """VRAM and swap times with W0 on the device vs in pinned host memory, images compared."""
    import gc

    device = torch.device(args.device)
    peaks: dict[bool, int] = {}
    images: dict[bool, list[Any]] = {}
    for on_host in (False, True):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        before, _ = _allocated(device)
        engine = _engine(args, torch.float16, model=args.w0_model, w0_on_host=on_host)
        loaded, _ = _allocated(device)
        swaps, images[on_host] = [], []
        for _, blend in BLENDS:
            started = time.perf_counter()
            engine.activate(list(blend))
            _sync(device)
            swaps.append((time.perf_counter() - started) * 1000)
            images[on_host].append(_generate(engine, blend, args).images[0])
        _, peak = _allocated(device)
        peaks[on_host] = peak - before
        where = ("pinned host" if device.type == "cuda" else "host") if on_host else "device"
        report.say(
            f"w0 on {where}: model {(loaded - before) >> 20} MiB, peak {(peak - before) >> 20} MiB "
            f"allocated, host W0 {engine._fused.host_bytes >> 20} MiB, swaps "
            + " ".join(f"{ms:.1f}" for ms in swaps)
            + " ms"
        )
        del engine
    worst = max(_image_diff(a, b)[0] for a, b in zip(images[False], images[True], strict=True))
    report.say(f"w0 on host vs device: images differ by mean {worst:.3f} at most (of 255)")
    report.check(worst <= IMAGE_MEAN_TOLERANCE, f"w0 on host: images differ by mean {worst:.2f}")
    if device.type == "cuda":
        report.check(peaks[True] < peaks[False], "w0 on host did not lower the peak VRAM")


def check_sdxl(args, report: Report) -> None:
    """The tiny SDXL: the fp16 engine (VAE kept in fp32) against fp32, then TensorRT with added inputs."""
    model = args.sdxl_model
    half = _engine(args, torch.float16, model=model)
    vae = half.pipeline.vae.dtype
    report.say(f"sdxl {model}: family {half.family.name}, fp16 engine with its VAE in {vae}")
    report.check(vae == torch.float32, f"sdxl fp16: the force_upcast VAE is {vae}, not float32")
    _compare_engines(args, report, "sdxl fp16", half, _engine(args, torch.float32, model=model))
    if not args.model_trt:
        return
    device = torch.device(args.device)
    pipeline = load_base_model(model, device=device).pipeline
    fused, plan_a, plan_b = _plans(pipeline, _adapters(pipeline))
    inputs = _unet_inputs(pipeline.unet, device)
    fused.apply(plan_a)
    reference = _unet_step(pipeline.unet, inputs, torch.float32).float()
    fused.apply(None)  # TensorRT takes the module weights as its pristine base: the base's
    check_tensorrt(model, pipeline, (plan_a, plan_b), inputs, reference, report, args, title="sdxl tensorrt")


def check_tensorrt(
    model: str, pipeline, plans, inputs, reference, report: Report, args, title: str = "tensorrt"
) -> None:
    """A refittable fp32 TensorRT UNet of ``pipeline`` (at its base weights): build, refit A -> B -> A,
    and its output against ``reference`` (the torch fp32 UNet under A)."""
    if importlib.util.find_spec("tensorrt") is None:
        report.say(f"{title}: not installed (pip install 'loraloom[tensorrt]'), skipped")
        return
    from server.backends.tensorrt_backend import BuildSettings, TensorRTUnet

    plan_a, plan_b = plans
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        trt_unet = TensorRTUnet(pipeline, model, BuildSettings(fp16=False), folder=Path(folder))
        built = time.perf_counter() - started
        report.say(f"{title}: build {built:.1f} s, {len(trt_unet.name_map)} refittable targets")
        for label, plan in (("A", plan_a), ("B", plan_b), ("A again", plan_a)):
            started = time.perf_counter()
            trt_unet.apply(plan)
            report.say(f"{title}: refit to {label} {(time.perf_counter() - started) * 1000:.1f} ms")
        diff = (_unet_step(trt_unet, inputs, torch.float32) - reference).abs().max().item()
        report.check(diff <= TRT_TOLERANCE, f"{title} differs by {diff:.2e} after A->B->A")
        step = _time_ms(lambda: _unet_step(trt_unet, inputs, torch.float32), args.steps, device)
        report.say(f"{title} fp32: step {step:.2f} ms, max diff after A->B->A {diff:.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="built-in name or path (default: tiny; micro with --cpu)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="UNet calls per timing (default 20; 2 on cpu)"
    )
    parser.add_argument(
        "--gen-steps", type=int, default=None, help="denoising steps per image (20; 2 on cpu)"
    )
    parser.add_argument("--sdxl-model", default="tiny-sdxl", help="the SDXL model of the sdxl section")
    parser.add_argument(
        "--w0-model", default=None, help="the model of the w0_on_host section (small; micro with --cpu)"
    )
    parser.add_argument("--compile-backend", default=None, help="inductor (default; aot_eager with --cpu)")
    parser.add_argument("--cpu", action="store_true", help="dry run of every section on the CPU")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="sections to skip: unet engine channels_last compiled w0_on_host sdxl",
    )
    args = parser.parse_args()
    args.device = "cpu" if args.cpu else "cuda"
    args.model = args.model or ("micro" if args.cpu else "tiny")
    args.w0_model = args.w0_model or ("micro" if args.cpu else "small")
    args.steps = args.steps or (2 if args.cpu else 20)
    args.gen_steps = args.gen_steps or (2 if args.cpu else 20)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.cpu else "inductor")
    args.model_trt = not args.cpu
    if args.cpu:
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # its "fp16 cannot run on cpu" warning: it can, slowly
        print(f"dry run on the CPU, model {args.model}  torch {torch.__version__}")
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--cpu runs a dry run)")
        return 2
    else:
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  model {args.model}")
    report = Report()
    started = time.perf_counter()
    if "unet" not in args.skip:
        check_unet(args, report)
    images = None
    if "engine" not in args.skip or "compiled" not in args.skip:
        images = check_engine(args, report)
    if "channels_last" not in args.skip:
        check_channels_last(args, report)
    if "compiled" not in args.skip and images is not None:
        check_compiled(args, report, images)
    if "w0_on_host" not in args.skip:
        check_w0_on_host(args, report)
    if "sdxl" not in args.skip:
        check_sdxl(args, report)
    verdict = (
        "ok" if not report.failures else f"FAILED ({len(report.failures)}): " + "; ".join(report.failures)
    )
    print(f"summary: {verdict} in {time.perf_counter() - started:.0f} s")
    return int(bool(report.failures))


if __name__ == "__main__":
    sys.exit(main())
