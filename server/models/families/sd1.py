"""SD 1.x: one CLIP ViT-L text encoder, its last hidden state (after the final layer norm)."""

from __future__ import annotations

import torch

from server.models.families.base import Conditioning, Family


def encode_last_hidden(
    pipeline, text: str, *, height: int, width: int, negative: bool, clip_skip: int = 1
) -> Conditioning:
    """diffusers' ``StableDiffusionPipeline.encode_prompt`` for one prompt (SD 1.x and 2.x)."""
    del height, width, negative  # SD 1.x/2.x conditioning depends on the text alone
    tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder
    device = pipeline.unet.device
    ids = tokenizer(
        [text],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = ids.attention_mask.to(device)
    embeds = text_encoder(ids.input_ids.to(device), attention_mask=mask)[0]
    return Conditioning(embeds.to(dtype=_dtype(text_encoder), device=device))


def _dtype(module) -> torch.dtype:
    return getattr(module, "dtype", torch.float32)


SD1 = Family(
    name="sd1",
    architecture="sd_v1",
    title="Stable Diffusion 1.x",
    pipeline_class="StableDiffusionPipeline",
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    resolution=512,
    kohya_version="sd_v1",
    encode=encode_last_hidden,
    matches=lambda pipeline: True,  # the fallback: a CLIP-conditioned SD UNet
)
