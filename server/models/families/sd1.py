"""SD 1.x: one CLIP ViT-L text encoder, its last hidden state (after the final layer norm).

Prompts are read A1111's way (``server.models.families.prompt_chunks``): emphasis, chunks of 75
tokens, and A1111's clip skip: 1 is the last layer, n > 1 the hidden state n layers from the end
through the final layer norm (diffusers' ``clip_skip=n - 1``), for the prompt and the negative
prompt alike (diffusers' ``encode_prompt`` skips layers on the prompt only).
"""

from __future__ import annotations

import torch

from server.models.families.base import Conditioning, Family
from server.models.families.prompt_chunks import emphasize, final_layer_norm, tokenize_chunks


def encode_last_hidden(
    pipeline, text: str, *, height: int, width: int, negative: bool, clip_skip: int = 1
) -> Conditioning:
    """diffusers' ``StableDiffusionPipeline.encode_prompt`` for one prompt (SD 1.x and 2.x), with
    A1111's emphasis and chunks: a short plain prompt's embeddings are diffusers' bit for bit."""
    tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder
    device = pipeline.unet.device
    masked = getattr(text_encoder.config, "use_attention_mask", False)
    states = []
    for chunk in tokenize_chunks(tokenizer, text, device):
        mask = chunk.mask if masked else None
        if clip_skip <= 1:
            hidden = text_encoder(chunk.ids, attention_mask=mask)[0]
        else:
            output = text_encoder(chunk.ids, attention_mask=mask, output_hidden_states=True)
            hidden = final_layer_norm(text_encoder)(output.hidden_states[-clip_skip])
        states.append(emphasize(hidden, chunk.weights))
    embeds = states[0] if len(states) == 1 else torch.cat(states, dim=1)

    def padding() -> torch.Tensor:
        empty = encode_last_hidden(
            pipeline, "", height=height, width=width, negative=False, clip_skip=clip_skip
        )
        return empty.embeds

    return Conditioning(embeds.to(dtype=_dtype(text_encoder), device=device), padding=padding)


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
