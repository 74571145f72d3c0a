"""Random LoRA adapters for a base model: real ``LoraAdapter`` objects for tests, benchmarks and demos.

They have the layout of a typical kohya / diffusers training run (attention
projections of the UNet and of the text encoder), a chosen rank, and factors
scaled so the update is visible but does not swamp the base weights.
"""

from __future__ import annotations

import torch

from adapters.canonical import BaseModelRef, LoraAdapter, LoraModule, ModuleShapes

UNET_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
UNET_CROSS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
TEXT_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def attention_targets(shapes: ModuleShapes, *, text_encoder: bool = True) -> list[str]:
    """The module keys a typical SD LoRA trains: attention projections (and the text encoder's)."""
    suffixes = UNET_ATTENTION + UNET_CROSS + (TEXT_ATTENTION if text_encoder else ())
    return sorted(key for key in shapes if key.endswith(suffixes) and len(shapes[key]) == 2)


def random_adapter(
    shapes: ModuleShapes,
    *,
    seed: int,
    rank: int = 4,
    alpha: float | None = None,
    targets: list[str] | None = None,
    strength: float = 0.05,
    base: BaseModelRef | None = None,
) -> LoraAdapter:
    """A rank-``rank`` adapter over ``targets`` (default ``attention_targets``), deterministic in ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    modules: dict[str, LoraModule] = {}
    for key in targets if targets is not None else attention_targets(shapes):
        shape = shapes[key]
        fan_in = 1
        for dim in shape[1:]:
            fan_in *= int(dim)
        down = torch.randn((rank, *shape[1:]), generator=generator) / fan_in**0.5
        up = torch.randn((shape[0], rank, *([1] * (len(shape) - 2))), generator=generator) * strength
        modules[key] = LoraModule(down=down, up=up, alpha=float(alpha if alpha is not None else rank))
    return LoraAdapter(modules=modules, metadata={"loraloom.synthetic_seed": str(seed)}, base=base)


def diffusers_file(adapter: LoraAdapter, pipeline) -> bytes:
    """``adapter`` as a diffusers LoRA file that this pipeline's ``load_lora_weights`` accepts.

    Text-encoder keys follow this pipeline's module layout (without ``text_model.``
    for a flattened transformers CLIP): diffusers 0.42 looks names up verbatim.
    """
    from adapters.formats import to_diffusers

    return to_diffusers(adapter, flat_text_encoder=not hasattr(pipeline.text_encoder, "text_model"))
