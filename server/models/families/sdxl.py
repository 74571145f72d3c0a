"""SDXL: two text encoders (CLIP ViT-L and OpenCLIP bigG with a projection) and added conditioning.

The UNet reads the penultimate hidden states of both encoders, concatenated, as its
cross-attention states, plus ``added_cond_kwargs``: the pooled, projected embedding of
encoder 2 (``text_embeds``) and ``time_ids`` = (original height, width, crop top, left,
target height, width). As diffusers' ``StableDiffusionXLPipeline``: the original and
target sizes are the requested size, the crop is (0, 0), and an empty negative prompt is
all zeros (``force_zeros_for_empty_prompt``, true for the SDXL base) rather than an
encoded empty string.
"""

from __future__ import annotations

import torch

from server.models.families.base import Conditioning, Family
from server.models.families.prompt_chunks import emphasize, tokenize_chunks

PENULTIMATE = -2
# SDXL's VAE has its own latent space; the latent2rgb approximation ComfyUI uses for it.
SDXL_LATENT_RGB = (
    (0.3920, 0.4054, 0.4549),
    (-0.2634, -0.0196, 0.0653),
    (0.0568, 0.1687, -0.0755),
    (-0.3112, -0.2359, -0.2076),
)


def time_ids(height: int, width: int, *, crop: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """SDXL's size conditioning for a ``height`` x ``width`` image, one row."""
    return torch.tensor([[height, width, crop[0], crop[1], height, width]], dtype=torch.float32)


def zeros_for_empty_negative(pipeline) -> bool:
    config = getattr(pipeline, "config", None)
    return bool(getattr(config, "force_zeros_for_empty_prompt", True))


def encode(
    pipeline, text: str, *, height: int, width: int, negative: bool, clip_skip: int = 1
) -> Conditioning:
    """diffusers' ``StableDiffusionXLPipeline.encode_prompt`` for one prompt, with A1111's emphasis
    and chunks: each chunk through both encoders (states concatenated along the features, each
    encoder's emphasized on its own), the chunks along the tokens; the pooled embedding is the first
    chunk's. A1111's ``clip_skip`` n reads hidden state ``-(n + 1)`` (diffusers' ``clip_skip=n - 1``,
    for the prompt and the negative prompt alike). A short plain prompt's embeddings are diffusers'
    bit for bit."""
    device = pipeline.unet.device
    layer = PENULTIMATE - (max(clip_skip, 1) - 1)
    pairs = ((pipeline.tokenizer, pipeline.text_encoder), (pipeline.tokenizer_2, pipeline.text_encoder_2))
    chunked = [tokenize_chunks(tokenizer, text, device) for tokenizer, _ in pairs]
    count = max(len(chunks) for chunks in chunked)
    if any(len(chunks) != count for chunks in chunked):  # tokenizers of different vocabularies
        chunked = [tokenize_chunks(tokenizer, text, device, count=count) for tokenizer, _ in pairs]
    pooled: torch.Tensor | None = None
    rows: list[torch.Tensor] = []
    for index in range(count):
        hidden: list[torch.Tensor] = []
        for (_, text_encoder), chunks in zip(pairs, chunked, strict=True):
            chunk = chunks[index]
            output = text_encoder(chunk.ids, output_hidden_states=True)
            if index == 0 and pooled is None and output[0].dim() == 2:
                pooled = output[0]  # CLIPTextModelWithProjection's text_embeds (encoder 2)
            hidden.append(emphasize(output.hidden_states[layer], chunk.weights))
        rows.append(torch.cat(hidden, dim=-1))
    embeds = rows[0] if count == 1 else torch.cat(rows, dim=1)
    if pooled is None:
        raise ValueError("SDXL's second text encoder must be a CLIPTextModelWithProjection (pooled output)")
    dtype = pipeline.text_encoder_2.dtype
    if negative and not text and zeros_for_empty_negative(pipeline):
        embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)

    def padding() -> torch.Tensor:  # the empty prompt encoded (not zeros), as A1111 pads
        empty = encode(pipeline, "", height=height, width=width, negative=False, clip_skip=clip_skip)
        return empty.embeds

    return Conditioning(
        embeds=embeds.to(dtype=dtype, device=device),
        pooled=pooled.to(dtype=dtype, device=device),
        time_ids=time_ids(height, width).to(dtype=dtype, device=device),
        padding=padding,
    )


SDXL = Family(
    name="sdxl",
    architecture="sdxl",
    title="Stable Diffusion XL",
    pipeline_class="StableDiffusionXLPipeline",
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    resolution=1024,
    kohya_version="sdxl_base_v1-0",
    encode=encode,
    matches=lambda pipeline: getattr(pipeline, "text_encoder_2", None) is not None,
    latent_rgb=SDXL_LATENT_RGB,
)
