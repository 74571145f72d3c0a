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
UNET_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
UNET_PROJECTIONS = ("proj_in", "proj_out")
TEXT_MLP = ("mlp.fc1", "mlp.fc2")


def attention_targets(shapes: ModuleShapes, *, text_encoder: bool = True) -> list[str]:
    """The module keys a typical SD LoRA trains: attention projections (and the text encoder's)."""
    suffixes = UNET_ATTENTION + UNET_CROSS + (TEXT_ATTENTION if text_encoder else ())
    return sorted(key for key in shapes if key.endswith(suffixes) and len(shapes[key]) == 2)


def kohya_targets(shapes: ModuleShapes) -> list[str]:
    """The module keys a kohya sd-scripts LoRA trains by default: every linear layer (and 1x1
    ``proj_in``/``proj_out`` convolution) of the UNet's transformer blocks (attention, feed-forward,
    projections) and the text encoders' attention and MLP (SD 1.5: 192 + 72 = 264 modules)."""
    suffixes = UNET_ATTENTION + UNET_CROSS + UNET_FEED_FORWARD + UNET_PROJECTIONS + TEXT_ATTENTION + TEXT_MLP
    return sorted(key for key in shapes if key.endswith(suffixes))


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


def factorization(dimension: int) -> tuple[int, int]:
    """LyCORIS' split of a dimension into two factors ``m <= n`` for LoKr (``factor=-1``: as balanced
    as the divisors allow; a prime gives ``(1, dimension)``)."""
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate + dimension // candidate > m + n:
            break
        m, n = candidate, dimension // candidate
    return (m, n) if m <= n else (n, m)


def random_lycoris(
    shapes: ModuleShapes,
    kind: str,
    *,
    seed: int,
    rank: int = 8,
    targets: list[str] | None = None,
    strength: float = 0.05,
) -> LoraAdapter:
    """A LoHa (``kind="loha"``) or LoKr (``"lokr"``) over ``targets`` (default ``attention_targets``)
    with LyCORIS' layout at network dim ``rank`` (alpha = rank / 2), deterministic in ``seed``.

    LoKr splits each dimension as LyCORIS does (``factorization``): ``w1`` is the small full
    factor, ``w2`` a low-rank pair when ``rank`` is under half its size, else full.
    """
    from adapters.canonical import LohaModule, LokrModule

    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * scale

    modules: dict[str, LoraModule | LohaModule | LokrModule] = {}
    for key in targets if targets is not None else attention_targets(shapes):
        out, *rest = (int(d) for d in shapes[key])
        n = 1
        for dim in rest:
            n *= dim
        if kind == "loha":
            modules[key] = LohaModule(
                w1_a=randn(out, rank, scale=strength**0.5),
                w1_b=randn(rank, n, scale=n**-0.5),
                w2_a=randn(out, rank, scale=strength**0.5),
                w2_b=randn(rank, n, scale=n**-0.5),
                alpha=rank / 2,
            )
            continue
        (a, b), (c, d) = factorization(out), factorization(rest[0])
        kernel = n // rest[0]
        w1 = randn(a, c, scale=strength**0.5)
        if rank < max(b, d) / 2:
            w2 = {
                "w2_a": randn(b, rank, scale=strength**0.5),
                "w2_b": randn(rank, d * kernel, scale=(d * kernel) ** -0.5),
            }
        else:
            w2 = {"w2": randn(b, d, *rest[1:], scale=strength**0.5 * (d * kernel) ** -0.5)}
        modules[key] = LokrModule(alpha=rank / 2, w1=w1, **w2)
    return LoraAdapter(modules=modules, metadata={"loraloom.synthetic_seed": str(seed)})
