"""The denoising loop over an SD pipeline's components (SD 1.x, SD 2.x, SDXL): txt2img, and
img2img and inpainting from the first latents ``server.engine.start`` makes.

Written out (rather than calling ``pipeline(...)``) so the engine controls the
per-step callback, cancellation, deadlines and previews. It performs exactly the
operations of diffusers' ``StableDiffusionPipeline.__call__`` (and, with the SDXL
family's conditioning, ``StableDiffusionXLPipeline.__call__``) for the features it
supports, so the same seed and parameters give the same image (tested). What the
families differ in (text encoders, added conditioning) is the family's ``encode``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.samplers import make_sampler
from server.engine.start import latent_statistics, start
from server.engine.types import GenerationSettings
from server.models.families import Conditioning, family_of

# Called after each step with (steps done, total steps, latents); may raise to stop the run.
StepCallback = Callable[[int, int, torch.Tensor], None]
# Called before each step with (step index, total steps); may raise to stop the run.
BeforeStep = Callable[[int, int], None]
# Called before the costly stages besides the steps ("encode", "decode"); may raise to stop the run.
BeforeStage = Callable[[str], None]


@dataclass(frozen=True)
class DenoiseOutput:
    images: list[Any]
    encode_ms: float
    denoise_ms: float
    decode_ms: float


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


def _decode(vae, latents: torch.Tensor, generators) -> torch.Tensor:
    """The VAE decode of ``latents``, in the VAE's dtype (float32 for an SDXL VAE kept out of fp16)."""
    statistics = latent_statistics(vae.config, latents)
    if statistics is not None:
        mean, std = statistics
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    dtype = getattr(vae, "dtype", latents.dtype)
    if isinstance(dtype, torch.dtype) and dtype != latents.dtype:
        latents = latents.to(dtype)
    return vae.decode(latents, return_dict=False, generator=generators)[0]


def denoise(
    pipeline,
    job: GenerationSettings,
    *,
    before_step: BeforeStep | None = None,
    after_step: StepCallback | None = None,
    output_type: str = "pil",
) -> DenoiseOutput:
    """Run ``job`` on ``pipeline`` (whatever weights it holds now) and decode the images.

    ``output_type`` is passed to the pipeline's image processor (``"pil"``, ``"np"``, ``"pt"``).
    """
    batch_after = (
        None if after_step is None else (lambda _, done, total, latents: after_step(done, total, latents))
    )
    return denoise_batch(
        pipeline, [job], before_step=before_step, after_step=batch_after, output_type=output_type
    )[0]


# Called after each step with (job index, steps done, total steps, that job's latents).
BatchStepCallback = Callable[[int, int, int, torch.Tensor], None]


@torch.inference_mode()
def denoise_batch(
    pipeline,
    jobs: Sequence[GenerationSettings],
    *,
    before_step: BeforeStep | None = None,
    after_step: BatchStepCallback | None = None,
    before_stage: BeforeStage | None = None,
    output_type: str = "pil",
) -> list[DenoiseOutput]:
    """Run several jobs of one ``batch_key`` as one batch; one output per job.

    Each job's prompt is encoded on its own and its noise drawn from its own seeds,
    so a job's inputs do not depend on its batch mates; CPU kernels may still
    round differently at another batch size (about 1e-6), so a batched image
    equals the unbatched one to that tolerance, not bit for bit.
    """
    first = jobs[0]
    if any(job.batch_key != first.batch_key for job in jobs):
        raise ValueError("jobs of one batch must share size, steps, guidance and sampler")
    unet, vae = pipeline.unet, pipeline.vae
    device = unet.device
    encode = family_of(pipeline).encode
    counts = [len(job.seeds) for job in jobs]
    count = sum(counts)
    cfg = first.guidance_scale > 1.0 and unet.config.time_cond_proj_dim is None

    if before_stage is not None:
        before_stage("encode")
    started = time.perf_counter()
    positive: list[Conditioning] = []
    negative: list[Conditioning] = []
    for job, n in zip(jobs, counts, strict=True):
        size = {"height": job.height, "width": job.width, "clip_skip": job.clip_skip}
        positive.append(encode(pipeline, job.prompt, negative=False, **size).repeat(n))
        if cfg:
            negative.append(encode(pipeline, job.negative_prompt, negative=True, **size).repeat(n))
    conditioning = Conditioning.cat(negative + positive)
    unet_kwargs = conditioning.unet_kwargs()
    encode_ms = _ms(started)

    started = time.perf_counter()
    scheduler = make_sampler(first.sampler, pipeline.scheduler, first.schedule)
    scheduler.set_timesteps(first.steps, device=device)
    generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for job in jobs for seed in job.seeds]
    begun = start(pipeline, jobs, scheduler, generators, dtype=conditioning.dtype, device=device)
    latents, timesteps, inpaint = begun.latents, begun.timesteps, begun.inpaint
    step_params = set(inspect.signature(scheduler.step).parameters)
    extra: dict[str, Any] = {}
    if "eta" in step_params:
        extra["eta"] = first.eta
    if "generator" in step_params:
        extra["generator"] = generators
    offsets = [sum(counts[:i]) for i in range(len(jobs))]

    total = len(timesteps)
    for index, t in enumerate(timesteps):
        if before_step is not None:
            before_step(index, total)
        model_input = torch.cat([latents] * 2) if cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if inpaint is not None:
            model_input = inpaint.unet_input(model_input, cfg)
        predicted = unet(model_input, t, **unet_kwargs, return_dict=False)[0]
        if cfg:
            uncond, text = predicted.chunk(2)
            predicted = uncond + first.guidance_scale * (text - uncond)
        latents = scheduler.step(predicted, t, latents, **extra, return_dict=False)[0]
        if inpaint is not None:
            latents = inpaint.keep(latents, scheduler, timesteps, index)
        if after_step is not None:
            for number, (offset, n) in enumerate(zip(offsets, counts, strict=True)):
                after_step(number, index + 1, total, latents[offset : offset + n])
    denoise_ms = _ms(started)

    if before_stage is not None:
        before_stage("decode")
    started = time.perf_counter()
    decoded = _decode(vae, latents, generators)
    if inpaint is not None:
        decoded = inpaint.overlay(decoded)
    images = pipeline.image_processor.postprocess(
        decoded, output_type=output_type, do_denormalize=[True] * count
    )
    decode_ms = _ms(started)
    return [
        DenoiseOutput(
            images=images[offset : offset + n],
            encode_ms=encode_ms,
            denoise_ms=denoise_ms,
            decode_ms=decode_ms,
        )
        for offset, n in zip(offsets, counts, strict=True)
    ]
