"""Suite ``trainer``: what the trainer's features cost against minimal hand-written loops.

Each section trains LoRA (rank 8, attention projections) at the model's native size
(64 px), batch 4, on the same 16 generated images and captions, with loraloom's trainer
and with the loop a person writes from diffusers' example (the peer): images and captions
prepared once, then per step VAE encode, text encoder(s), noise, UNet, MSE, AdamW. The
trainer adds per-step seeded generators, caption processing, gradient clipping, an LR
schedule and its progress bar. The two are interleaved step by step (the peer's step runs
inside the trainer's ``on_step`` callback and is excluded from the trainer's time), so a
busy CPU slows both alike.

- ``tiny`` (SD 1.x topology): ``train_step_ratio_tiny``, trainer steps/s vs diffusers + PEFT,
  medians over steps after warm-up; ``train_peak_memory_mb_tiny``, peak memory of each in its
  own child process (CUDA: ``max_memory_allocated``; CPU: peak RSS).
- ``cached``: ``train_step_ratio_tiny_cached``, the trainer with ``cache_latents`` (latents on
  disk, both flips; steps of the first epoch, which fill the cache, are not counted) vs the
  peer with every image encoded once up front and kept in memory (the best a hand-written
  loop does).
- ``sdxl`` (the factory's tiny SDXL): ``train_step_ratio_tiny_sdxl`` vs a hand-written
  diffusers + PEFT SDXL loop (diffusers' ``train_text_to_image_lora_sdxl.py`` reduced: both
  text encoders through ``encode_prompt`` each step, ``add_time_ids`` from the original size,
  crop and target size); ``train_peak_memory_mb_tiny_sdxl`` as for ``tiny``.

``python -m bench.trainer [--quick] [--only tiny,cached,sdxl] [--json FILE]``.
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

PEER = "a minimal hand-written diffusers + PEFT loop"
SECTIONS = ("tiny", "cached", "sdxl")
BASE = "tiny"
SDXL_BASE = "tiny-sdxl"
BATCH = 4
RANK = 8
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LR = 1e-4
WARMUP = 3
IMAGES = 16


def _make_data(root: Path) -> Path:
    from PIL import Image, ImageDraw

    folder = root / "shapes"
    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}
    for i in range(IMAGES):
        colour = list(colours)[i % 4]
        image = Image.new("RGB", (80, 80), (245, 245, 240))
        ImageDraw.Draw(image).ellipse((20 + i, 20, 60 + i % 5, 60), fill=colours[colour])
        image.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"{colour} circle, shape")
    return folder


def _config(data: Path, work: Path, steps: int, *, base: str = BASE, cache_latents: bool = False):
    from trainer import TrainConfig

    return TrainConfig(
        data_dir=str(data),
        name="bench",
        base=base,
        cache_latents=cache_latents,
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
    """The peer: diffusers' text-to-image LoRA example reduced to its core.

    ``cache_latents``: every image is encoded once, up front, and the latents kept in memory.
    """

    def __init__(self, data: Path, *, base: str = BASE, cache_latents: bool = False) -> None:
        import torch
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        from server.models.loader import load_base_model
        from trainer.data import scan_dataset

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_base_model(base, device=self.device).pipeline
        self.resolution = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        dataset = scan_dataset(data, resolution=self.resolution)
        self.examples = dataset.examples
        self.captions = [e.caption for e in dataset.examples]
        self.pixels = torch.stack([dataset.pixels(i) for i in range(len(dataset))]).to(self.device)
        self.prepare_text()
        self.latents = None
        if cache_latents:
            with torch.no_grad():
                self.latents = torch.cat(
                    [self.encode(self.pixels[i : i + BATCH]) for i in range(0, len(self.pixels), BATCH)]
                )
        self.pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS))
        self.params = [p for p in self.pipe.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.unet.train()
        self.index = 0

    def prepare_text(self) -> None:
        tokenizer = self.pipe.tokenizer
        self.ids = tokenizer(
            self.captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def encode(self, pixels):
        pipe = self.pipe
        return pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor

    def conditioning(self, rows: list[int]) -> dict:
        return {"encoder_hidden_states": self.pipe.text_encoder(self.ids[rows])[0]}

    def step(self) -> float:
        torch, pipe = self.torch, self.pipe
        n = len(self.pixels)
        rows = [(self.index * BATCH + j) % n for j in range(BATCH)]
        self.index += 1
        with torch.no_grad():
            latents = self.latents[rows] if self.latents is not None else self.encode(self.pixels[rows])
            conditioning = self.conditioning(rows)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (BATCH,), device=self.device
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = pipe.unet(noisy, timesteps, **conditioning).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


class MinimalSDXLLoop(MinimalLoop):
    """The SDXL peer: diffusers' ``train_text_to_image_lora_sdxl.py`` reduced to its core: the
    pipeline's ``encode_prompt`` (both text encoders) each step, and ``add_time_ids`` of each
    image's original size, center-crop corner and target size."""

    def __init__(self, data: Path, *, base: str = SDXL_BASE, cache_latents: bool = False) -> None:
        super().__init__(data, base=base, cache_latents=cache_latents)

    def prepare_text(self) -> None:
        torch, size = self.torch, self.resolution
        time_ids = []
        for example in self.examples:
            width, height = example.size
            scale = size / min(width, height)  # resize the short side, then center-crop
            top = max(0, round((round(height * scale) - size) / 2.0))
            left = max(0, round((round(width * scale) - size) / 2.0))
            time_ids.append([height, width, top, left, size, size])
        self.time_ids = torch.tensor(time_ids, dtype=torch.float32, device=self.device)

    def conditioning(self, rows: list[int]) -> dict:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            [self.captions[i] for i in rows],
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        added = {"text_embeds": pooled, "time_ids": self.time_ids[rows]}
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": added}


PEERS = {BASE: MinimalLoop, SDXL_BASE: MinimalSDXLLoop}


def _interleaved(data: Path, work: Path, steps: int, *, base: str, cache_latents: bool = False):
    """Train with loraloom's trainer and the peer, step for step: each one's step times."""
    from trainer import train

    peer = PEERS[base](data, cache_latents=cache_latents)
    trainer_times: list[float] = []
    peer_times: list[float] = []
    mark = [time.perf_counter()]

    def interleave(info) -> None:
        trainer_times.append(time.perf_counter() - mark[0])
        started = time.perf_counter()
        peer.step()
        peer_times.append(time.perf_counter() - started)
        mark[0] = time.perf_counter()

    train(_config(data, work, steps, base=base, cache_latents=cache_latents), on_step=interleave)
    return trainer_times, peer_times


def run(quick: bool = False, sections: frozenset[str] | None = None) -> list[Metric]:
    import os

    sections = frozenset(SECTIONS) if sections is None else sections
    steps = 10 if quick else 40
    metrics: list[Metric] = []
    per_epoch = IMAGES // BATCH
    with tempfile.TemporaryDirectory() as tmp:
        data = _make_data(Path(tmp))
        for section, base in (("tiny", BASE), ("sdxl", SDXL_BASE)):
            if section not in sections:
                continue
            ours, theirs = _interleaved(data, Path(tmp) / section, steps, base=base)
            suffix = "tiny" if base == BASE else "tiny_sdxl"
            ours_sps, theirs_sps = _steps_per_second(ours[WARMUP:]), _steps_per_second(theirs[WARMUP:])
            note = f"{base}, {BATCH}x64px, rank {RANK}, {len(ours) - WARMUP} steps"
            memory = {which: _peak_memory_mb(which, data, base) for which in ("trainer", "peer")}
            metrics += [
                Metric(f"train_step_ratio_{suffix}", ours_sps, theirs_sps, "steps/s", "higher", note),
                Metric(
                    f"train_peak_memory_mb_{suffix}", memory["trainer"], memory["peer"], "MB", "lower",
                    _memory_kind(),
                ),
            ]  # fmt: skip
        if "cached" in sections:
            previous = os.environ.get("LORALOOM_HOME")
            os.environ["LORALOOM_HOME"] = str(Path(tmp) / "home")  # a cold cache of its own
            try:
                ours, theirs = _interleaved(data, Path(tmp) / "cached", steps, base=BASE, cache_latents=True)
            finally:
                if previous is None:
                    os.environ.pop("LORALOOM_HOME", None)
                else:
                    os.environ["LORALOOM_HOME"] = previous
            skip = max(WARMUP, per_epoch)  # the first epoch fills the cache
            note = f"{BASE}, {BATCH}x64px, rank {RANK}, {len(ours) - skip} steps after the first epoch"
            metrics.append(
                Metric(
                    "train_step_ratio_tiny_cached",
                    _steps_per_second(ours[skip:]),
                    _steps_per_second(theirs[skip:]),
                    "steps/s",
                    "higher",
                    note + "; peer: latents encoded once, in memory",
                )
            )
    return metrics


def _steps_per_second(seconds: list[float]) -> float:
    return 1000.0 / median_ms(seconds)


def _memory_kind() -> str:
    import torch

    return "CUDA max_memory_allocated" if torch.cuda.is_available() else "peak RSS of a child, after imports"


def _peak_memory_mb(which: str, data: Path, base: str = BASE) -> float:
    """Run a few steps of ``which`` in a fresh process and return its peak memory in MB."""
    import torch

    threads = ["--threads", str(torch.get_num_threads())]
    command = ["--measure-memory", which, "--data", str(data), "--base", base, *threads]
    out = subprocess.run(
        [sys.executable, "-m", "bench.trainer", *command],
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


def _measure_memory(which: str, data: Path, base: str = BASE) -> None:
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
            config = _config(data, Path(tmp), steps, base=base)
            config.progress = False
            train(config)
    else:
        loop = PEERS[base](data)
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
    parser.add_argument("--base", default=BASE, help=argparse.SUPPRESS)
    parser.add_argument("--only", metavar="SECTIONS", help=f"comma-separated, of {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.measure_memory:
        _measure_memory(args.measure_memory, Path(args.data), args.base)
        return 0
    sections = frozenset(part.strip() for part in args.only.split(",")) if args.only else None
    metrics = run(quick=args.quick, sections=sections)
    print_table("trainer", metrics, peer=PEER)
    if args.json:
        write_json(args.json, "trainer", metrics, peer=PEER, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
