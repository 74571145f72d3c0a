"""Where a run starts: its timesteps and first latents, for txt2img, img2img and inpainting.

The operations are diffusers' (``StableDiffusionImg2ImgPipeline`` and
``StableDiffusionInpaintPipeline``) for one image per generator: strength < 1 re-runs
the last ``int(steps * strength)`` steps from the init image's latents noised to the
first of them; inpainting keeps the unmasked area at the init image's latents, noised
to the next timestep after every step (a 4-channel UNet), or hands the mask and the
masked image's latents to a 9-channel inpainting UNet. The decoded image then gets the
init image's own pixels back outside the mask (A1111's overlay; diffusers'
``apply_overlay``): the VAE decoder mixes neighbouring latents, so without it the kept
area would drift by more than the VAE's round trip. Each image's VAE sample and noise
are drawn from its own generator, so an image does not depend on its batch mates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.types import GenerationSettings

INPAINT_UNET_CHANNELS = 9


def schedule_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The timesteps that run: all of them, or the last ``int(steps * strength)`` (diffusers' rule)."""
    if strength >= 1.0:
        return scheduler.timesteps
    kept = min(int(steps * strength), steps)
    start = max(steps - kept, 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


@dataclass
class Inpaint:
    """The mask (latent size, 1 = repaint) and what keeps or conditions the rest."""

    mask: torch.Tensor
    image_latents: torch.Tensor | None  # 4-channel UNet: the kept area's clean latents
    noise: torch.Tensor | None
    masked_image_latents: torch.Tensor | None  # 9-channel UNet: its extra input
    pixels: torch.Tensor | None = None  # the init images ([-1, 1]) and the pixel mask, for the overlay
    pixel_mask: torch.Tensor | None = None

    def overlay(self, decoded: torch.Tensor) -> torch.Tensor:
        """``decoded`` ([-1, 1]) with the init image's pixels outside the mask."""
        if self.pixels is None or self.pixel_mask is None:
            return decoded
        mask = self.pixel_mask.to(decoded.device, decoded.dtype)
        return decoded * mask + self.pixels.to(decoded.device, decoded.dtype) * (1 - mask)

    def unet_input(self, model_input: torch.Tensor, cfg: bool) -> torch.Tensor:
        """``model_input`` with the mask and masked image appended (9-channel UNets only)."""
        if self.masked_image_latents is None:
            return model_input
        mask, masked = self.mask, self.masked_image_latents
        if cfg:
            mask, masked = torch.cat([mask] * 2), torch.cat([masked] * 2)
        return torch.cat([model_input, mask.to(model_input.dtype), masked.to(model_input.dtype)], dim=1)

    def keep(self, latents: torch.Tensor, scheduler, timesteps: torch.Tensor, index: int) -> torch.Tensor:
        """After step ``index``: the kept area back at the init image, noised to the next timestep."""
        if self.image_latents is None:
            return latents
        proper = self.image_latents
        if index < len(timesteps) - 1:
            proper = scheduler.add_noise(proper, self.noise, torch.tensor([timesteps[index + 1]]))
        return (1 - self.mask) * proper + self.mask * latents


@dataclass
class Start:
    latents: torch.Tensor
    timesteps: torch.Tensor
    inpaint: Inpaint | None = None


def start(
    pipeline,
    jobs: Sequence[GenerationSettings],
    scheduler,
    generators: list[torch.Generator],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> Start:
    """The first latents of a batch of jobs (one ``batch_key``) and the timesteps they run."""
    from diffusers.utils.torch_utils import randn_tensor

    first = jobs[0]
    unet, vae = pipeline.unet, pipeline.vae
    factor = pipeline.vae_scale_factor
    inpaint_unet = unet.config.in_channels == INPAINT_UNET_CHANNELS
    channels = getattr(vae.config, "latent_channels", 4) if inpaint_unet else unet.config.in_channels
    count = sum(len(job.seeds) for job in jobs)
    shape = (count, channels, first.height // factor, first.width // factor)
    timesteps = schedule_timesteps(scheduler, first.steps, first.strength)
    masked = first.mask is not None or inpaint_unet

    if first.init_image is None or not (first.strength < 1.0 or masked):
        noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        latents = noise * scheduler.init_noise_sigma
        if not inpaint_unet:
            return Start(latents, timesteps)
        # txt2img on an inpainting model: everything masked, the masked image blank (as A1111).
        blank = torch.zeros(count, 3, first.height, first.width)
        mask = torch.ones(count, 1, *shape[2:], device=device, dtype=dtype)
        masked_latents = encode_images(vae, blank, generators, dtype=dtype, device=device)
        return Start(latents, timesteps, Inpaint(mask, None, None, masked_latents))

    images = _images(pipeline, jobs)
    need_image_latents = first.strength < 1.0 or (masked and not inpaint_unet)
    image_latents = (
        encode_images(vae, images, generators, dtype=dtype, device=device) if need_image_latents else None
    )
    noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    if first.strength >= 1.0:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(count))
    if not masked:
        return Start(latents, timesteps)

    condition = _masks(pipeline, jobs)  # (count, 1, H, W), 1 = repaint
    mask = torch.nn.functional.interpolate(condition, size=shape[2:]).to(device=device, dtype=dtype)
    if inpaint_unet:
        masked_latents = encode_images(
            vae, images * (condition < 0.5), generators, dtype=dtype, device=device
        )
        return Start(latents, timesteps, Inpaint(mask, None, None, masked_latents, images, condition))
    return Start(latents, timesteps, Inpaint(mask, image_latents, noise, None, images, condition))


def _images(pipeline, jobs: Sequence[GenerationSettings]) -> torch.Tensor:
    """Each job's init image once per image it asks for, as the VAE reads it ([-1, 1], float32)."""
    pictures = [job.init_image.image for job in jobs for _ in job.seeds]  # type: ignore[union-attr]
    first = jobs[0]
    return pipeline.image_processor.preprocess(pictures, height=first.height, width=first.width).float()


def _masks(pipeline, jobs: Sequence[GenerationSettings]) -> torch.Tensor:
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(
        vae_scale_factor=pipeline.vae_scale_factor,
        do_normalize=False,
        do_binarize=True,
        do_convert_grayscale=True,
    )
    first = jobs[0]
    masks = [job.mask.image for job in jobs for _ in job.seeds]  # type: ignore[union-attr]
    return processor.preprocess(masks, height=first.height, width=first.width)


def encode_images(
    vae, images: torch.Tensor, generators: list[torch.Generator], *, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The VAE's latents of ``images`` (one sample per image, from its own generator), scaled as
    the UNet reads them."""
    encoder_dtype = getattr(vae, "dtype", torch.float32)
    samples = []
    for index, generator in enumerate(generators):
        image = images[index : index + 1].to(device=device, dtype=encoder_dtype)
        samples.append(vae.encode(image).latent_dist.sample(generator=generator))
    latents = torch.cat(samples).to(dtype)
    statistics = latent_statistics(vae.config, latents)
    if statistics is not None:
        mean, std = statistics
        return (latents - mean) * vae.config.scaling_factor / std
    return latents * vae.config.scaling_factor


def latent_statistics(config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE's per-channel latent mean and std when its config has them (``latents_mean``/``_std``),
    shaped and placed like ``like``."""
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        return None
    view = (1, len(mean), 1, 1)
    return (
        torch.tensor(mean).view(view).to(like.device, like.dtype),
        torch.tensor(std).view(view).to(like.device, like.dtype),
    )
