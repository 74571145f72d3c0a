"""A cheap preview of latents: a fixed linear map from SD's 4 latent channels to RGB.

No VAE decode: the coefficients are the model family's latent-to-RGB
approximation (as A1111 / ComfyUI's "latent2rgb" previews use; SD 1.x's by
default, SDXL has its own); the result is one pixel per latent cell, optionally
enlarged.
"""

from __future__ import annotations

import torch
from PIL import Image

from server.models.families.base import SD_LATENT_RGB


def latent_preview(
    latents: torch.Tensor,
    *,
    size: int | None = None,
    factors: tuple[tuple[float, float, float], ...] = SD_LATENT_RGB,
) -> Image.Image:
    """An RGB image of the first latent in the batch (``size``: longest side in pixels)."""
    table = torch.tensor(factors, dtype=torch.float32)
    latent = latents[0].detach().to("cpu", torch.float32)
    if latent.shape[0] != table.shape[0]:
        latent = latent[: table.shape[0]]
    rgb = torch.einsum("chw,cr->hwr", latent, table)
    rgb = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(rgb)
    if size and max(image.size) != size:
        scale = size / max(image.size)
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
            Image.Resampling.BILINEAR,
        )
    return image
