"""The txt2img loop over a StableDiffusionPipeline's components.

Written out (rather than calling ``pipeline(...)``) so the engine controls the
per-step callback, cancellation, deadlines and previews. It performs exactly the
operations of diffusers' ``StableDiffusionPipeline.__call__`` for the features it
supports, so the same seed and parameters give the same image (tested).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.samplers import make_sampler
from server.engine.types import GenerationSettings

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


def _encode(pipeline, texts: list[str], device: torch.device) -> torch.Tensor:
    tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder
    ids = tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = ids.attention_mask.to(device)
    embeds = text_encoder(ids.input_ids.to(device), attention_mask=mask)[0]
    return embeds.to(dtype=text_encoder.dtype, device=device)


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
    counts = [len(job.seeds) for job in jobs]
    count = sum(counts)
    cfg = first.guidance_scale > 1.0 and unet.config.time_cond_proj_dim is None

    if before_stage is not None:
        before_stage("encode")
    started = time.perf_counter()
    positive, negative = [], []
    for job, n in zip(jobs, counts, strict=True):
        embeds = _encode(pipeline, [job.prompt], device)
        positive.append(embeds.repeat(1, n, 1).view(n, embeds.shape[1], -1))
        if cfg:
            embeds = _encode(pipeline, [job.negative_prompt], device)
            negative.append(embeds.repeat(1, n, 1).view(n, embeds.shape[1], -1))
    embeds = torch.cat(negative + positive) if cfg else torch.cat(positive)
    encode_ms = _ms(started)

    started = time.perf_counter()
    scheduler = make_sampler(first.sampler, pipeline.scheduler)
    scheduler.set_timesteps(first.steps, device=device)
    timesteps = scheduler.timesteps
    generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for job in jobs for seed in job.seeds]
    from diffusers.utils.torch_utils import randn_tensor

    factor = pipeline.vae_scale_factor
    shape = (count, unet.config.in_channels, first.height // factor, first.width // factor)
    latents = randn_tensor(shape, generator=generators, device=device, dtype=embeds.dtype)
    latents = latents * scheduler.init_noise_sigma
    step_params = set(inspect.signature(scheduler.step).parameters)
    extra: dict[str, Any] = {}
    if "eta" in step_params:
        extra["eta"] = 0.0
    if "generator" in step_params:
        extra["generator"] = generators
    offsets = [sum(counts[:i]) for i in range(len(jobs))]

    total = len(timesteps)
    for index, t in enumerate(timesteps):
        if before_step is not None:
            before_step(index, total)
        model_input = torch.cat([latents] * 2) if cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        noise = unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + first.guidance_scale * (text - uncond)
        latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        if after_step is not None:
            for number, (offset, n) in enumerate(zip(offsets, counts, strict=True)):
                after_step(number, index + 1, total, latents[offset : offset + n])
    denoise_ms = _ms(started)

    if before_stage is not None:
        before_stage("decode")
    started = time.perf_counter()
    decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generators)[0]
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
