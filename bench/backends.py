"""Suite ``backends``: the UNet on each available backend beside torch eager, on ``small``.

- ``step_ratio_small_<backend>``: ms per UNet step (batch 2, as with guidance);
  the peer is torch eager on the same threads, timed in alternation with every
  backend (torch's thread pool suffers most on a busy machine: medians vary
  0.3-8 s here). Ratio > 1: the backend is faster. OpenVINO appears twice,
  ``openvino_fp32`` and ``openvino_bf16`` (the bf16 rows only on a CPU with
  native BF16).
- ``swap_small_<backend>``: ms to write a rank-8 blend over the attention
  projections into the backend's weights; the peer is the torch fused path
  writing the same blend into its scratch buffers (a materialized blend only
  repoints parameters, ~0.05 ms, and the engine does that for torch anyway).
- ``switch_small_openvino_<precision>``: ms to switch between two blends seen
  before: OpenVINO with two blend slots (the engine's setting) selects the
  slot's requests; the peer is the torch fused path repointing to materialized
  blends.
- ``image_diff_small_<backend>``: max pixel difference (of 255) of a 4-step image
  under that blend from the torch image; the peer column is the tolerance
  (2 for float32 backends, the README's bf16 bound for bf16).
- ``decode_ratio_small_openvino_<precision>``: ms of the VAE decode of one
  256 px image on OpenVINO; the peer is torch.
- ``encode_ratio_small_openvino_<precision>``: ms to encode one prompt with the
  text encoder on OpenVINO (its adapter targets as inputs); the peer is torch.
- ``lean_step_small_openvino_bf16``: ms per step of the lean OpenVINO variant
  (3x3 convolutions constant; blends that leave them at base) against the full
  one (every target an input; blends that touch them).
- ``flops_efficiency_small``: the UNet step's FLOPs (torch's flop counter) per
  second, as % of this machine's measured float32 matmul rate; loraloom is the
  fastest float32 backend, the peer torch eager.

TensorRT is not measured here (it needs CUDA): ``scripts/gpu_check.py``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.report import Metric

PEER = "torch eager"
THREADS = 2
IMAGE_TOLERANCE = 2.0
BF16_IMAGE_TOLERANCE = 12.0  # the bound tests/backends/test_openvino_backend.py checks on tiny
MODEL = "small"


def _median_ms(call, repeats: int) -> float:
    call()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000.0


def _interleaved_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each call, timed in alternation so a busy machine slows all alike."""
    for call in calls.values():
        call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(times) * 1000.0 for name, times in samples.items()}


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
    from server.engine.denoise import denoise
    from server.engine.types import GenerationSettings

    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    job = GenerationSettings("a red square", "", size, size, steps, 5.0, 3, "euler", 1)
    return np.asarray(denoise(pipeline, job).images[0], dtype=np.float32)


def _openvino_backends(pipeline, threads: int, folder: Path) -> dict[str, tuple]:
    """``openvino_<precision>`` -> (UNet, VAE decoder, text encoder), for the precisions this CPU runs."""
    try:
        from server.backends.openvino_backend import OvUnet
        from server.backends.openvino_runtime import cpu_supports_bf16
        from server.backends.openvino_text import OvTextEncoder
        from server.backends.openvino_vae import OvVaeDecoder
    except ImportError:
        return {}
    precisions = ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]
    found = {}
    for precision in precisions:
        settings = {"precision": precision, "threads": threads, "folder": folder}
        found[f"openvino_{precision}"] = (
            OvUnet(pipeline, f"bench-{MODEL}", slots=1, **settings),  # one slot: swaps always write
            OvVaeDecoder(pipeline.vae, f"bench-{MODEL}", **settings),
            OvTextEncoder(pipeline, f"bench-{MODEL}", **settings),
        )
    return found


def run(quick: bool = False) -> list[Metric]:
    from server.backends.onnx_export import example_inputs
    from server.backends.onnxruntime_backend import OrtUnet
    from server.backends.openvino_backend import FULL, LEAN
    from server.backends.pipeline_view import PipelineView
    from server.engine.fuse import FusedWeights
    from server.engine.synthetic import random_adapter
    from server.models.factory import build_pipeline
    from server.models.shapes import lora_targets, module_shapes

    repeats = 3 if quick else 10
    pipeline = build_pipeline(MODEL, seed=0)
    for component in ("unet", "text_encoder", "vae"):
        getattr(pipeline, component).requires_grad_(False).eval()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        unets = {"onnxruntime": OrtUnet(pipeline, f"bench-{MODEL}", threads=threads, folder=folder)}
        openvino = _openvino_backends(pipeline, threads, folder)
    unets.update({name: parts[0] for name, parts in openvino.items()})
    shapes = {k: v for k, v in module_shapes(pipeline).items() if k.startswith("unet.")}
    fused = FusedWeights(lora_targets(pipeline))
    prepared = [
        fused.prepare(
            random_adapter(shapes, seed=s, rank=8, strength=0.3), name=str(s), version=1, sha256=str(s) * 8
        )
        for s in range(2)
    ]
    plans = [fused.plan([(prepared[0], 1.0)]), fused.plan([(prepared[1], 0.7)])]

    def swapper(target) -> Callable[[], None]:
        turn = [0]  # each target alternates between the two plans on its own

        def swap() -> None:
            turn[0] += 1
            target.apply(plans[turn[0] % 2])

        return swap

    swap_ms = _interleaved_ms(
        {"torch": swapper(fused), **{name: swapper(unet) for name, unet in unets.items()}}, repeats * 3
    )
    # Switching between two blends seen before: torch repoints to materialized weights, OpenVINO
    # (two blend slots, as the engine runs it) selects the slot's infer requests.
    for plan in plans:
        fused.materialize(plan)
    slotted = {}
    if openvino:
        from server.backends.openvino_backend import OvUnet

        for name in openvino:
            precision = name.removeprefix("openvino_")
            slotted[name] = OvUnet(pipeline, f"bench-{MODEL}", precision=precision, folder=folder, slots=2)
    switch_ms = _interleaved_ms(
        {"torch": swapper(fused), **{name: swapper(unet) for name, unet in slotted.items()}}, repeats * 3
    )
    del slotted

    inputs = example_inputs(pipeline.unet, batch=2)
    sample, timestep, hidden = inputs

    def stepper(unet) -> Callable[[], object]:
        return lambda: unet(sample, timestep, encoder_hidden_states=hidden)

    with torch.no_grad():
        step_ms = _interleaved_ms(
            {"torch": stepper(pipeline.unet), **{name: stepper(unet) for name, unet in unets.items()}},
            repeats,
        )

    fused.apply(plans[0])
    for unet in unets.values():
        unet.apply(plans[0])
    steps = 4
    reference = _image(pipeline, steps)
    views = {"onnxruntime": PipelineView(pipeline, unet=unets["onnxruntime"])}
    for name, (unet, vae, text) in openvino.items():
        views[name] = PipelineView(pipeline, unet=unet, vae=vae, text_encoder=text)
    diffs = {name: float(np.abs(_image(view, steps) - reference).max()) for name, view in views.items()}

    note = f"{MODEL}, batch 2, {threads} threads"
    metrics = []
    for name in unets:
        tolerance = BF16_IMAGE_TOLERANCE if name.endswith("bf16") else IMAGE_TOLERANCE
        metrics += [
            Metric(f"step_ratio_{MODEL}_{name}", step_ms[name], step_ms["torch"], "ms", "lower", note),
            Metric(
                f"swap_{MODEL}_{name}",
                swap_ms[name],
                swap_ms["torch"],
                "ms",
                "lower",
                "rank-8 blend, attention",
            ),
            Metric(f"image_diff_{MODEL}_{name}", diffs[name], tolerance, "/255", "lower", f"{steps} steps"),
        ]
        if name in switch_ms:
            metrics.append(
                Metric(
                    f"switch_{MODEL}_{name}",
                    switch_ms[name],
                    switch_ms["torch"],
                    "ms",
                    "lower",
                    "between two blends seen before (torch: materialized)",
                )
            )

    latents = torch.randn(1, 4, sample.shape[2], sample.shape[3], generator=torch.Generator().manual_seed(0))
    decoders = {name: parts[1] for name, parts in openvino.items()}
    with torch.no_grad():
        decode_ms = _interleaved_ms(
            {
                "torch": lambda: pipeline.vae.decode(latents, return_dict=False),
                **{name: (lambda vae=vae: vae.decode(latents)) for name, vae in decoders.items()},
            },
            repeats,
        )
    for name in decoders:
        metrics.append(
            Metric(
                f"decode_ratio_{MODEL}_{name}", decode_ms[name], decode_ms["torch"], "ms", "lower", "256 px"
            )
        )

    ids = pipeline.tokenizer(["a red square"], padding="max_length", return_tensors="pt").input_ids
    encoders = {name: parts[2] for name, parts in openvino.items()}
    with torch.no_grad():
        encode_ms = _interleaved_ms(
            {
                "torch": lambda: pipeline.text_encoder(ids),
                **{name: (lambda text=text: text(ids)) for name, text in encoders.items()},
            },
            repeats * 3,
        )
    for name in encoders:
        metrics.append(
            Metric(
                f"encode_ratio_{MODEL}_{name}",
                encode_ms[name],
                encode_ms["torch"],
                "ms",
                "lower",
                "one prompt",
            )
        )

    if "openvino_bf16" in unets:
        unet = unets["openvino_bf16"]
        active = unet.variant

        def on(variant: str) -> Callable[[], object]:
            def step() -> object:
                unet.variant = variant  # same weights either way: the blend leaves 3x3 convs at base
                return unet(sample, timestep, encoder_hidden_states=hidden)

            return step

        variant_ms = _interleaved_ms({variant: on(variant) for variant in (LEAN, FULL)}, repeats)
        unet.variant = active
        metrics.append(
            Metric(
                f"lean_step_{MODEL}_openvino_bf16",
                variant_ms[LEAN],
                variant_ms[FULL],
                "ms",
                "lower",
                "peer: the full variant (every target an input)",
            )
        )

    flops = _unet_flops(pipeline.unet, inputs)
    peak = _matmul_flops_per_s(repeats)
    float32 = {name: ms for name, ms in step_ms.items() if name != "torch" and not name.endswith("bf16")}
    fastest = min(float32, key=float32.get)
    metrics.append(
        Metric(
            f"flops_efficiency_{MODEL}",
            flops / (step_ms[fastest] / 1000.0) / peak * 100.0,
            flops / (step_ms["torch"] / 1000.0) / peak * 100.0,
            "%",
            "higher",
            f"{fastest}; {flops / 1e9:.2f} GFLOP/step, matmul peak {peak / 1e9:.1f} GFLOP/s",
        )
    )
    return metrics
