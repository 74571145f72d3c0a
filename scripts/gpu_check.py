"""GPU check: torch CUDA (fp32, fp16) and, if installed, TensorRT with refit, on the tiny model.

Run on a machine with CUDA (and TensorRT for the refit path):

    python scripts/gpu_check.py [--model tiny] [--steps 20]

Prints per-step UNet latency of each path, the TensorRT swap (refit) time, and
the max difference of each path's UNet output from torch fp32 under one blend,
and after A -> B -> A (a leak would show there). Exits 1 if a difference is
over its tolerance, 2 if there is no CUDA device.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.backends.onnx_export import example_inputs
from server.engine.fuse import FusedWeights
from server.engine.synthetic import random_adapter
from server.models.factory import build_pipeline
from server.models.shapes import lora_targets, module_shapes

FP16_TOLERANCE = 5e-2
TRT_TOLERANCE = 1e-2


def _time_ms(call, repeats: int) -> float:
    call()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1000.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    pipeline = build_pipeline(args.model, seed=0).to("cuda")
    pipeline.unet.requires_grad_(False).eval()
    shapes = {k: v for k, v in module_shapes(pipeline).items() if k.startswith("unet.")}
    fused = FusedWeights(lora_targets(pipeline))
    prepared = [
        fused.prepare(
            random_adapter(shapes, seed=s, rank=8, strength=0.3), name=str(s), version=1, sha256=str(s) * 8
        )
        for s in range(2)
    ]
    plan_a, plan_b = fused.plan([(prepared[0], 1.0)]), fused.plan([(prepared[1], 0.7)])
    sample, timestep, hidden = (t.to("cuda") for t in example_inputs(pipeline.unet, batch=2))
    failed = False

    def unet(model, dtype=torch.float32):
        with torch.no_grad():
            return model(
                sample.to(dtype), timestep, encoder_hidden_states=hidden.to(dtype), return_dict=False
            )[0]

    fused.apply(plan_a)
    reference = unet(pipeline.unet).float()
    print(f"torch fp32: step {_time_ms(lambda: unet(pipeline.unet), args.steps):.2f} ms")
    started = time.perf_counter()
    fused.apply(plan_b)
    fused.apply(plan_a)
    torch.cuda.synchronize()
    print(f"torch fused swap B->A: {(time.perf_counter() - started) / 2 * 1000:.2f} ms per swap")

    half = build_pipeline(args.model, seed=0).to("cuda", torch.float16)
    half.unet.requires_grad_(False).eval()
    half_fused = FusedWeights(lora_targets(half))
    half_plan = half_fused.plan(
        [
            (
                half_fused.prepare(
                    random_adapter(shapes, seed=0, rank=8, strength=0.3), name="0", version=1, sha256="0" * 8
                ),
                1.0,
            )
        ]
    )
    half_fused.apply(half_plan)
    diff = (unet(half.unet, torch.float16).float() - reference).abs().max().item()
    failed |= diff > FP16_TOLERANCE
    step = _time_ms(lambda: unet(half.unet, torch.float16), args.steps)
    print(f"torch fp16: step {step:.2f} ms, max diff {diff:.2e}")

    if importlib.util.find_spec("tensorrt") is None:
        print("tensorrt: not installed (pip install 'loraloom[tensorrt]'), skipped")
        return int(failed)
    from server.backends.tensorrt_backend import BuildSettings, TensorRTUnet

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        trt_unet = TensorRTUnet(pipeline, args.model, BuildSettings(fp16=False), folder=Path(folder))
        built = time.perf_counter() - started
        print(f"tensorrt: build {built:.1f} s, {len(trt_unet.name_map)} refittable targets")
        for label, plan in (("A", plan_a), ("B", plan_b), ("A again", plan_a)):
            started = time.perf_counter()
            trt_unet.apply(plan)
            print(f"tensorrt: refit to {label} {(time.perf_counter() - started) * 1000:.1f} ms")
        diff = (unet(trt_unet) - reference).abs().max().item()
        failed |= diff > TRT_TOLERANCE
        step = _time_ms(lambda: unet(trt_unet), args.steps)
        print(f"tensorrt fp32: step {step:.2f} ms, max diff after A->B->A {diff:.2e}")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
