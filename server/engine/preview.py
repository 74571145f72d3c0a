"""A cheap preview of latents: a fixed linear map from SD's 4 latent channels to RGB.

No VAE decode: the coefficients are the well-known SD 1.x latent-to-RGB
approximation (as used by A1111 / ComfyUI "latent2rgb" previews); the result is
one pixel per latent cell, optionally enlarged.
"""

from __future__ import annotations

import torch
from PIL import Image

_LATENT_RGB = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)


def latent_preview(latents: torch.Tensor, *, size: int | None = None) -> Image.Image:
    """An RGB image of the first latent in the batch (``size``: longest side in pixels)."""
    latent = latents[0].detach().to("cpu", torch.float32)
    if latent.shape[0] != _LATENT_RGB.shape[0]:
        latent = latent[: _LATENT_RGB.shape[0]]
    rgb = torch.einsum("chw,cr->hwr", latent, _LATENT_RGB)
    rgb = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(rgb)
    if size and max(image.size) != size:
        scale = size / max(image.size)
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
            Image.Resampling.BILINEAR,
        )
    return image
