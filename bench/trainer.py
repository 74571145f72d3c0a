"""Suite ``trainer``: what the trainer's features cost against a minimal hand-written PEFT loop.

Both train LoRA (rank 8, attention projections) on the tiny model at its
native 64 px, batch 4, on the same 16 generated images and captions. The
minimal loop is what a person writes from diffusers' example: images and
tokens prepared once, then VAE encode, noise, UNet, MSE, AdamW. The trainer
adds per-step seeded generators, caption processing, gradient clipping, an LR
schedule and its progress bar. The two are interleaved step by step (the
minimal loop's step runs inside the trainer's ``on_step`` callback, and is
excluded from the trainer's time), so a busy CPU slows both alike.

- ``train_step_ratio_tiny``: trainer steps/s (loraloom) vs the minimal loop
  (peer), medians over steps after warm-up.
- ``train_peak_memory_mb_tiny``: peak memory of each, measured in its own
  child process (CUDA: ``max_memory_allocated``; CPU: peak RSS).

``python -m bench.trainer [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import Metric, median_ms, print_table, write_json

PEER = "a minimal hand-written PEFT loop"
BASE = "tiny"
BATCH = 4
RANK = 8
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LR = 1e-4
WARMUP = 3


def _make_data(root: Path) -> Path:
    from PIL import Image, ImageDraw

    folder = root / "shapes"
    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}
    for i in range(16):
        colour = list(colours)[i % 4]
        image = Image.new("RGB", (80, 80), (245, 245, 240))
        ImageDraw.Draw(image).ellipse((20 + i, 20, 60 + i % 5, 60), fill=colours[colour])
        image.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"{colour} circle, shape")
    return folder


def _config(data: Path, work: Path, steps: int):
    from trainer import TrainConfig

    return TrainConfig(
        data_dir=str(data),
        name="bench",
        base=BASE,
        steps=steps,
        batch_size=BATCH,
        rank=RANK,
        alpha=RANK,
        targets=list(TARGETS),
        lr=LR,
        lr_scheduler="cosine",
        warmup_steps=2,
        output_dir=str(work),
        no_register=True,
        progress=True,
    )


class MinimalLoop:
    """The peer: diffusers' text-to-image LoRA example reduced to its core."""

    def __init__(self, data: Path) -> None:
        import torch
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        from server.models.loader import load_base_model
        from trainer.data import scan_dataset

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_base_model(BASE, device=self.device).pipeline
        dataset = scan_dataset(
            data, resolution=self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        )
        self.pixels = torch.stack([dataset.pixels(i) for i in range(len(dataset))]).to(self.device)
        tokenizer = self.pipe.tokenizer
        self.ids = tokenizer(
            [e.caption for e in dataset.examples],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        self.pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS))
        self.params = [p for p in self.pipe.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.unet.train()
        self.index = 0

    def step(self) -> float:
        torch, pipe = self.torch, self.pipe
        n = len(self.pixels)
        rows = [(self.index * BATCH + j) % n for j in range(BATCH)]
        self.index += 1
        with torch.no_grad():
            latents = pipe.vae.encode(self.pixels[rows]).latent_dist.sample() * pipe.vae.config.scaling_factor
            encoded = pipe.text_encoder(self.ids[rows])[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (BATCH,), device=self.device
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = pipe.unet(noisy, timesteps, encoded).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def run(quick: bool = False) -> list[Metric]:
    from trainer import train

    steps = 10 if quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        data = _make_data(Path(tmp))
        peer = MinimalLoop(data)
        trainer_times: list[float] = []
        peer_times: list[float] = []
        mark = [time.perf_counter()]

        def interleave(info) -> None:
            trainer_times.append(time.perf_counter() - mark[0])
            started = time.perf_counter()
            peer.step()
            peer_times.append(time.perf_counter() - started)
            mark[0] = time.perf_counter()

        train(_config(data, Path(tmp) / "work", steps), on_step=interleave)
        memory = {which: _peak_memory_mb(which, data) for which in ("trainer", "peer")}
    ours, theirs = trainer_times[WARMUP:], peer_times[WARMUP:]
    ours_sps, theirs_sps = 1000.0 / median_ms(ours), 1000.0 / median_ms(theirs)
    note = f"{BASE}, {BATCH}x64px, rank {RANK}, {len(ours)} steps"
    return [
        Metric("train_step_ratio_tiny", ours_sps, theirs_sps, "steps/s", "higher", note),
        Metric("train_peak_memory_mb_tiny", memory["trainer"], memory["peer"], "MB", "lower", _memory_kind()),
    ]


def _memory_kind() -> str:
    import torch

    return "CUDA max_memory_allocated" if torch.cuda.is_available() else "peak RSS of a child, after imports"


def _peak_memory_mb(which: str, data: Path) -> float:
    """Run a few steps of ``which`` in a fresh process and return its peak memory in MB."""
    import torch

    threads = ["--threads", str(torch.get_num_threads())]
    out = subprocess.run(
        [sys.executable, "-m", "bench.trainer", "--measure-memory", which, "--data", str(data), *threads],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_mb"])


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _measure_memory(which: str, data: Path) -> None:
    import diffusers  # noqa: F401  (imports first: their resident pages are the same for both)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from trainer.api import train

    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark after imports
    steps = 3
    if which == "trainer":
        with tempfile.TemporaryDirectory() as tmp:
            config = _config(data, Path(tmp), steps)
            config.progress = False
            train(config)
    else:
        loop = MinimalLoop(data)
        for _ in range(steps):
            loop.step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _peak_rss_mb()
    print(json.dumps({"peak_mb": peak}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--json", metavar="FILE", help="also write the metrics as JSON to FILE")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--measure-memory", choices=("trainer", "peer"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.measure_memory:
        _measure_memory(args.measure_memory, Path(args.data))
        return 0
    metrics = run(quick=args.quick)
    print_table("trainer", metrics, peer=PEER)
    if args.json:
        write_json(args.json, "trainer", metrics, peer=PEER, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
