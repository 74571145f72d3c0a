"""Suite ``backends``: the UNet on each available backend beside torch eager, on ``small``.

- ``step_ratio_small_<backend>``: ms per UNet step (batch 2, as with guidance);
  the peer is torch eager on the same threads, timed in alternation with it
  (torch's thread pool suffers most on a busy machine: medians vary 0.3-8 s here).
  Ratio > 1: the backend is faster.
- ``swap_small_<backend>``: ms to write a rank-8 blend over the attention
  projections into the backend's weights; the peer is the torch fused path
  writing the same blend into its scratch buffers (a materialized blend only
  repoints parameters, ~0.05 ms, and the engine does that for torch anyway).
- ``image_diff_small_<backend>``: max pixel difference (of 255) of a 4-step image
  under that blend from the torch image; the peer column is the tolerance.
- ``flops_efficiency_small``: the UNet step's FLOPs (torch's flop counter) per
  second, as % of this machine's measured float32 matmul rate; loraloom is the
  fastest backend, the peer torch eager.

TensorRT is not measured here (it needs CUDA): ``scripts/gpu_check.py``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import Metric

PEER = "torch eager"
THREADS = 2
IMAGE_TOLERANCE = 2.0
MODEL = "small"


def _median_ms(call, repeats: int) -> float:
    call()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000.0


def _interleaved_ms(first, second, repeats: int) -> tuple[float, float]:
    """Median ms of each, timed in alternation so a busy machine slows both alike."""
    first(), second()
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for call, times in ((first, samples[0]), (second, samples[1])):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
    return statistics.median(samples[0]) * 1000.0, statistics.median(samples[1]) * 1000.0


def _matmul_flops_per_s(repeats: int) -> float:
    size = 1024
    a, b = torch.randn(size, size), torch.randn(size, size)
    ms = _median_ms(lambda: torch.mm(a, b), repeats)
    return 2 * size**3 / (ms / 1000.0)


def _unet_flops(unet, inputs) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    sample, timestep, hidden = inputs
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)
    return float(counter.get_total_flops())


def _image(pipeline, steps: int) -> np.ndarray:
    from server.engine.denoise import DenoiseJob, denoise

    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    job = DenoiseJob("a red square", "", size, size, steps, 5.0, [3], "euler")
    return np.asarray(denoise(pipeline, job).images[0], dtype=np.float32)


def run(quick: bool = False) -> list[Metric]:
    from server.backends.onnx_export import example_inputs
    from server.backends.onnxruntime_backend import OrtUnet, with_unet
    from server.engine.fuse import FusedWeights
    from server.engine.synthetic import random_adapter
    from server.models.factory import build_pipeline
    from server.models.shapes import lora_targets, module_shapes

    repeats = 3 if quick else 10
    pipeline = build_pipeline(MODEL, seed=0)
    for component in ("unet", "text_encoder", "vae"):
        getattr(pipeline, component).requires_grad_(False).eval()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        ort_unet = OrtUnet(pipeline, f"bench-{MODEL}", threads=threads, folder=Path(folder))
    shapes = {k: v for k, v in module_shapes(pipeline).items() if k.startswith("unet.")}
    fused = FusedWeights(lora_targets(pipeline))
    prepared = [
        fused.prepare(
            random_adapter(shapes, seed=s, rank=8, strength=0.3), name=str(s), version=1, sha256=str(s) * 8
        )
        for s in range(2)
    ]
    plans = [fused.plan([(prepared[0], 1.0)]), fused.plan([(prepared[1], 0.7)])]
    turn = [0]

    def swap(target) -> None:
        turn[0] += 1
        target.apply(plans[turn[0] % 2])

    swap_ort = _median_ms(lambda: swap(ort_unet), repeats * 3)
    swap_torch = _median_ms(lambda: swap(fused), repeats * 3)

    inputs = example_inputs(pipeline.unet, batch=2)
    sample, timestep, hidden = inputs
    with torch.no_grad():
        step_torch, step_ort = _interleaved_ms(
            lambda: pipeline.unet(sample, timestep, encoder_hidden_states=hidden),
            lambda: ort_unet(sample, timestep, encoder_hidden_states=hidden),
            repeats,
        )

    fused.apply(plans[0])
    ort_unet.apply(plans[0])
    steps = 4
    diff = float(np.abs(_image(with_unet(pipeline, ort_unet), steps) - _image(pipeline, steps)).max())

    flops = _unet_flops(pipeline.unet, inputs)
    peak = _matmul_flops_per_s(repeats)
    eff_ort = flops / (step_ort / 1000.0) / peak * 100.0
    eff_torch = flops / (step_torch / 1000.0) / peak * 100.0
    note = f"{MODEL}, batch 2, {threads} threads"
    return [
        Metric(f"step_ratio_{MODEL}_onnxruntime", step_ort, step_torch, "ms", "lower", note),
        Metric(f"swap_{MODEL}_onnxruntime", swap_ort, swap_torch, "ms", "lower", "rank-8 blend, attention"),
        Metric(f"image_diff_{MODEL}_onnxruntime", diff, IMAGE_TOLERANCE, "/255", "lower", f"{steps} steps"),
        Metric(
            f"flops_efficiency_{MODEL}",
            eff_ort,
            eff_torch,
            "%",
            "higher",
            f"{flops / 1e9:.2f} GFLOP/step, matmul peak {peak / 1e9:.1f} GFLOP/s",
        ),
    ]
