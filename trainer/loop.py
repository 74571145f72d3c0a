"""The training loop: noise prediction with LoRA on a frozen base, one optimizer step at a time.

Reproducibility is by construction: micro-batch ``m`` draws its images,
caption edits, latent sample, noise and timesteps from generators seeded with
``(seed, m)`` alone, so the run is a pure function of the config, and a run
resumed from a checkpoint at step ``s`` (weights, optimizer, LR schedule)
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters.errors import Cancelled, FailedPrecondition, InvalidArgument
from adapters.home import data_home
from server.models.families import Conditioning
from server.models.loader import BaseModel, load_base_model
from trainer import checkpoint as ckpt
from trainer.cache import LatentCache, TextCache, modules_fingerprint, tokenizer_fingerprint
from trainer.config import DEFAULT_STEPS, TEXT_ENCODER_TARGETS, TrainConfig
from trainer.data import CaptionOptions, Dataset, Item, read_pairs, scan_dataset
from trainer.network import LoraNetwork, add_network
from trainer.plots import LOSS_CURVE, SAMPLE_GRID, draw_loss_curve, draw_sample_grid
from trainer.progress import ProgressBar, RunClock
from trainer.samples import sample_images

log = logging.getLogger(__name__)

PLOT_EVERY_SECONDS = 60.0  # the loss curve is also redrawn at checkpoints, samples and the end


class TrainingInterrupted(Cancelled):
    """Training stopped on request (Ctrl-C); a checkpoint was saved to resume from."""

    def __init__(self, message: str, *, step: int, checkpoint: Path) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class StepInfo:
    step: int
    total_steps: int
    loss: float
    lr: float
    steps_per_second: float | None = None  # optimizer steps only (sampling, checkpoints excluded)
    eta_seconds: float | None = None  # the steps left, plus the sampling and checkpoints to come


@dataclass
class LoopOutcome:
    steps: int
    total_steps: int
    losses: list[float]
    samples: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0
    loss_curve: Path | None = None
    sample_grid: Path | None = None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidArgument(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition(
            "device cuda was asked for but no CUDA device is available; use --device cpu"
        )
    return device


def _derived_seed(seed: int, micro_step: int) -> int:
    return (seed * 1_000_003 + micro_step * 7_919 + 17) % (2**63 - 1)


def literal_prompt(caption: str) -> str:
    """``caption`` as the family's encoder reads it literally: brackets and backslashes escaped, so a
    caption's ``(...)`` is text, not A1111 emphasis (kohya's sd-scripts read captions literally too)."""
    return re.sub(r"([\\()\[\]])", r"\\\1", caption)


class _StopOnSigint:
    """First Ctrl-C: finish the step, save a checkpoint, stop. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step to save a checkpoint (Ctrl-C again to quit without saving)")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """Everything a run holds: base model, data, LoRA network, optimizer, schedule."""

    def __init__(self, config: TrainConfig, *, base: BaseModel | None = None) -> None:
        config.check()
        self.config = config
        read_pairs(
            config.data_dir, config.caption_extension
        )  # folder and caption errors before the model loads
        self.device = pick_device(config.device) if base is None else base.device
        self.base = base or load_base_model(config.base, device=self.device)
        pipeline = self.base.pipeline
        self.pipeline = pipeline
        self.autocast_dtype = None
        if config.mixed_precision != "no":
            if self.device.type == "cuda":
                self.autocast_dtype = torch.float16 if config.mixed_precision == "fp16" else torch.bfloat16
            else:
                log.warning("mixed_precision=%s ignored on CPU: training in fp32", config.mixed_precision)
        self.resolution = config.resolution or self.base.resolution
        multiple = pipeline.vae_scale_factor * 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
        self.dataset: Dataset = scan_dataset(
            config.data_dir,
            resolution=self.resolution,
            caption_extension=config.caption_extension,
            caption_options=CaptionOptions(
                trigger_word=config.trigger_word,
                dropout=config.caption_dropout,
                shuffle_tags=config.shuffle_tags,
                keep_tokens=config.keep_tokens,
            ),
            buckets=config.buckets,
            bucket_step=config.bucket_step,
            min_bucket=config.min_bucket,
            max_bucket=config.max_bucket,
            size_multiple=multiple,
        )
        self.batches_per_epoch = self.dataset.batches_per_epoch(config.batch_size)
        if config.steps is not None:
            self.total_steps = config.steps
        elif config.epochs is not None:
            self.total_steps = max(1, math.ceil(config.epochs * self.batches_per_epoch / config.grad_accum))
        else:
            self.total_steps = DEFAULT_STEPS
        self.output_dir = (
            Path(config.output_dir).expanduser()
            if config.output_dir
            else (data_home() / "training" / config.adapter_name)
        )
        # Describe the base before LoRA layers change its module tree and state dict.
        _ = self.base.module_shapes, self.base.fingerprint
        self.family = self.base.family
        self.text_encoder_lrs = self._text_encoder_lrs()
        self.latent_cache, self.text_cache = self._caches()
        self.network: LoraNetwork = add_network(
            pipeline,
            network=config.network,
            dora=config.dora,
            rank=config.rank,
            alpha=config.alpha,
            unet_targets=config.unet_target_modules(),
            text_encoder_targets=list(TEXT_ENCODER_TARGETS) if self.text_encoder_lrs else None,
            text_encoders=tuple(self.text_encoder_lrs),
            seed=config.seed,
        )
        groups = [{"params": self.network.parameters("unet"), "lr": config.lr}]
        for component, lr in self.text_encoder_lrs.items():
            groups.append({"params": self.network.parameters(component), "lr": lr})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        name = config.lr_scheduler
        if name == "constant" and config.warmup_steps:
            name = "constant_with_warmup"
        self.lr_scheduler = get_scheduler(
            name,
            optimizer=self.optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=self.total_steps,
        )
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.step = 0
        self.losses: list[float] = []

    # ------------------------------------------------------------------ one micro-batch

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    def loss_on(self, micro_step: int) -> torch.Tensor:
        """The loss of micro-batch ``micro_step`` (a pure function of the seed and the step)."""
        config, pipeline = self.config, self.pipeline
        generator = torch.Generator(device=self.device).manual_seed(_derived_seed(config.seed, micro_step))
        rng = random.Random(_derived_seed(config.seed, micro_step))
        indices = self.dataset.batch_at(micro_step, config.batch_size, config.seed)
        items = self.dataset.draw(indices, rng, random_flip=config.random_flip)
        latents = self.latents(items, generator)
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        if config.noise_offset:
            offset = torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=self.device
            )
            noise = noise + config.noise_offset * offset
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            generator=generator,
            device=self.device,
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        target = (
            noise
            if prediction_type == "epsilon"
            else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        )
        conditioning = self.conditioning(items)
        with self._autocast():
            prediction = pipeline.unet(noisy, timesteps, **conditioning.unet_kwargs()).sample
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if config.min_snr_gamma:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, timesteps)
            weights = torch.clamp(snr, max=config.min_snr_gamma)
            weights = weights / (snr + 1) if prediction_type == "v_prediction" else weights / snr
            loss = loss * weights
        return loss.mean()

    # ------------------------------------------------------------------ latents and conditioning

    def _text_encoder_lrs(self) -> dict[str, float]:
        """The text encoders trained (the family's, in order), each with its learning rate; 0: frozen."""
        config = self.config
        if not config.train_text_encoder:
            return {}
        first = config.lr if config.text_encoder_lr is None else config.text_encoder_lr
        second = first if config.text_encoder_2_lr is None else config.text_encoder_2_lr
        if config.text_encoder_2_lr is not None and len(self.family.text_encoders) < 2:
            log.warning("text_encoder_2_lr ignored: %s has one text encoder", self.family.title)
        rates = dict(zip(self.family.text_encoders, (first, second), strict=False))
        trained = {component: lr for component, lr in rates.items() if lr > 0}
        if not trained:
            log.warning("train_text_encoder with text-encoder learning rates of 0: the encoders stay frozen")
        return trained

    def _caches(self) -> tuple[LatentCache | None, TextCache | None]:
        """The latent cache (``cache_latents``) and, while every text encoder is frozen, the text cache."""
        config, pipeline = self.config, self.pipeline
        latents = None
        if config.cache_latents:
            latents = LatentCache(
                self.dataset,
                self._vae_parameters,
                vae_fingerprint=modules_fingerprint([("vae", pipeline.vae)]),
                dtype=f"{pipeline.vae.dtype}/{self.autocast_dtype}",
                both_flips=config.random_flip,
            )
        if self.text_encoder_lrs:
            return latents, None
        on_disk = config.cache_latents and not config.shuffle_tags
        fingerprint = ""
        if on_disk:
            encoders = [(name, getattr(pipeline, name)) for name in self.family.text_encoders]
            tokenizers = [tokenizer_fingerprint(getattr(pipeline, name)) for name in self.family.tokenizers]
            fingerprint = modules_fingerprint(encoders) + ":" + ":".join(tokenizers)
            fingerprint = hashlib.sha256(fingerprint.encode()).hexdigest()
        text = TextCache(self._encode_caption, fingerprint=fingerprint, family=self.family.name, disk=on_disk)
        return latents, text

    def _vae_parameters(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE encoder's latent-distribution parameters (mean, log-variance) of ``pixels``."""
        with torch.no_grad(), self._autocast():
            return self.pipeline.vae.encode(pixels.to(self.device)).latent_dist.parameters

    def latents(self, items: list[Item], generator: torch.Generator) -> torch.Tensor:
        """The scaled latents of a micro-batch, sampled with ``generator`` from the VAE's distribution
        (computed now, or read from the latent cache: the same draw either way)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if self.latent_cache is None:
            pixels = torch.stack([self.dataset.pixels(item.index, flip=item.flip) for item in items])
            parameters = self._vae_parameters(pixels)
        else:
            cached = [self.latent_cache.parameters(item.index, item.flip) for item in items]
            parameters = torch.stack(cached).to(self.device)
        config = self.pipeline.vae.config
        latents = DiagonalGaussianDistribution(parameters).sample(generator=generator).float()
        shift = getattr(config, "shift_factor", None) or 0.0
        return (latents - shift) * config.scaling_factor

    def conditioning(self, items: list[Item]) -> Conditioning:
        """The UNet's conditioning of a micro-batch: each caption through the family's encoder (as
        the server encodes a prompt; kept while the encoders are frozen), rows of different lengths
        joined as the server joins them; SDXL's pooled embedding, and ``time_ids`` built from each
        image's original size, crop and bucket (as SDXL was trained)."""
        with self._autocast():
            rows = [self._caption_conditioning(item.caption) for item in items]
        joined = Conditioning.cat(rows)
        if joined.pooled is None:
            return joined
        sizes = [self.dataset.examples[item.index].size_conditioning(item.flip) for item in items]
        time_ids = torch.tensor(sizes, dtype=joined.dtype, device=joined.embeds.device)
        return Conditioning(joined.embeds, joined.pooled, time_ids)

    def _caption_conditioning(self, caption: str) -> Conditioning:
        text = literal_prompt(caption)
        if self.text_cache is not None:
            return self.text_cache.get(text, self.device)
        return self._encode_caption(text)

    def _encode_caption(self, text: str) -> Conditioning:
        size = self.resolution
        return self.family.encode(self.pipeline, text, height=size, width=size, negative=False)

    # ------------------------------------------------------------------ resume and checkpoints

    def checkpoint_options(self) -> dict:
        options = self.config.to_dict()
        options["resolution"] = self.resolution
        return options

    def resume(self, resume: str) -> int:
        path = ckpt.resolve_resume(resume, self.output_dir)
        saved = ckpt.load_checkpoint(path)
        ckpt.check_compatible(saved, self.checkpoint_options())
        self.network.load_state_dict(saved.network)
        self.optimizer.load_state_dict(saved.state["optimizer"])
        self.lr_scheduler.load_state_dict(saved.state["lr_scheduler"])
        if self.scaler is not None and saved.state.get("scaler"):
            self.scaler.load_state_dict(saved.state["scaler"])
        ckpt.restore_rng(saved.state)
        self.step = saved.step
        self.losses = list(saved.info.get("losses", []))[: self.step]
        log.info("resumed from %s at step %d", path, self.step)
        return self.step

    def save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(
            self.output_dir,
            step=self.step,
            network=self.network.state_dict(),
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            scaler=self.scaler,
            info={"options": self.checkpoint_options(), "losses": self.losses},
            keep=self.config.keep_checkpoints,
        )

    # ------------------------------------------------------------------ the loop

    def optimizer_step(self) -> float:
        """Accumulate ``grad_accum`` micro-batches, step the optimizer and the schedule; the mean loss."""
        accum = self.config.grad_accum
        total = 0.0
        for k in range(accum):
            loss = self.loss_on(self.step * accum + k)
            scaled = loss / accum
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
            total += float(loss.detach())
        params = self.network.parameters()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / accum

    def run(self, on_step: Callable[[StepInfo], None] | None = None) -> LoopOutcome:
        config = self.config
        outcome = LoopOutcome(steps=0, total_steps=self.total_steps, losses=[])
        if config.resume:
            outcome.resumed_from = self.resume(config.resume)
        sample_at = set(config.sample_steps) | {self.total_steps} if config.validation_prompts else set()
        self.pipeline.unet.train()
        for component in self.text_encoder_lrs:
            getattr(self.pipeline, component).train()
        every = config.checkpoint_every
        clock = RunClock(
            self.total_steps,
            events={"sample": sample_at, "checkpoint": (lambda s: s % every == 0) if every else ()},
        )
        started = plotted = time.perf_counter()
        with _StopOnSigint() as stop, self._progress(clock) as bar:
            while self.step < self.total_steps:
                with clock.timing_step():
                    loss = self.optimizer_step()
                self.losses.append(loss)
                lr = self.lr_scheduler.get_last_lr()[0]
                bar.update(self.step, loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                plot = self.step == self.total_steps or time.perf_counter() - plotted >= PLOT_EVERY_SECONDS
                if every and self.step % every == 0:
                    bar.busy("checkpoint")
                    with clock.timing("checkpoint"):
                        outcome.checkpoints.append(self.save_checkpoint())
                        outcome.loss_curve = self._draw_loss_curve()
                    plot, plotted = False, time.perf_counter()
                if self.step in sample_at:
                    bar.busy("sampling")
                    with clock.timing("sample"):
                        outcome.samples.extend(self._sample())
                        outcome.sample_grid = self._draw_sample_grid() or outcome.sample_grid
                        outcome.loss_curve = self._draw_loss_curve()
                    plot, plotted = False, time.perf_counter()
                if plot:
                    outcome.loss_curve = self._draw_loss_curve()
                    plotted = time.perf_counter()
                if on_step is not None:
                    on_step(
                        StepInfo(
                            step=self.step,
                            total_steps=self.total_steps,
                            loss=loss,
                            lr=lr,
                            steps_per_second=clock.steps_per_second,
                            eta_seconds=clock.eta(self.step),
                        )
                    )
                if stop.requested and self.step < self.total_steps:
                    path = self.save_checkpoint()
                    self._draw_loss_curve()
                    raise TrainingInterrupted(
                        f"training stopped at step {self.step} of {self.total_steps}; checkpoint saved to "
                        f"{path}. Resume with --resume latest (same options) to finish the run",
                        step=self.step,
                        checkpoint=path,
                    )
        self.pipeline.unet.eval()
        for component in self.family.text_encoders:
            getattr(self.pipeline, component).eval()
        outcome.steps = self.step
        outcome.losses = list(self.losses)
        outcome.seconds = time.perf_counter() - started
        return outcome

    def _sample(self) -> list[Path]:
        return sample_images(
            self.pipeline,
            self.config.validation_prompts,
            step=self.step,
            folder=self.output_dir / "samples",
            seed=self.config.seed,
            resolution=self.resolution,
            inference_steps=self.config.sample_inference_steps,
        )

    def _draw_loss_curve(self) -> Path:
        title = f"{self.config.adapter_name} ({self.config.network}{' + DoRA' if self.config.dora else ''})"
        return draw_loss_curve(
            self.losses, self.output_dir / LOSS_CURVE, total_steps=self.total_steps, title=title
        )

    def _draw_sample_grid(self) -> Path | None:
        return draw_sample_grid(
            self.output_dir / "samples",
            self.config.validation_prompts,
            self.output_dir / SAMPLE_GRID,
            up_to_step=self.step,
        )

    @contextlib.contextmanager
    def _progress(self, clock: RunClock) -> Iterator[ProgressBar]:
        bar = ProgressBar(
            clock,
            initial=self.step,
            desc=f"training {self.config.adapter_name}",
            enabled=self.config.progress,
        )
        try:
            yield bar
        finally:
            bar.close()
