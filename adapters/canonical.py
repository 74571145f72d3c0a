"""The canonical in-memory form every LoRA format normalizes to.

A module key names one weight-bearing layer of the base model as
``<component>.<module path>``, with diffusers / transformers module paths:
``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` or
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``. The base model is
described to this package only as a map of such keys to weight shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# A base model as this package sees it: module key -> weight shape,
# (out, in) for a linear layer, (out, in, kh, kw) for a conv layer.
ModuleShapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update: ``delta_W = scale * up @ down``.

    ``down`` (A) is ``(rank, in)`` for a linear layer or ``(rank, in, kh, kw)`` for a
    conv layer (LoCon); ``up`` (B) is ``(out, rank)`` or ``(out, rank, 1, 1)``.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the base weight this module updates."""
        return (int(self.up.shape[0]), *(int(d) for d in self.down.shape[1:]))

    @property
    def nbytes(self) -> int:
        return self.down.numel() * self.down.element_size() + self.up.numel() * self.up.element_size()

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight update ``scale * B @ A``, shaped like the base weight."""
        down = self.down.to(dtype).reshape(self.rank, -1)
        up = self.up.to(dtype).reshape(self.up.shape[0], self.rank)
        return (up @ down).mul_(self.scale).reshape(self.weight_shape)


@dataclass(frozen=True)
class BaseModelRef:
    """What an adapter was made for.

    ``architecture`` is a coarse family (``sd_v1``, ``sd_v2``, ``sdxl``, or
    ``loraloom:<size>`` for the factory and toy models); ``fingerprint`` names the
    exact base weights when known (a sha256 hex digest), else ``""``.
    """

    architecture: str
    fingerprint: str = ""


@dataclass
class LoraAdapter:
    """A parsed adapter: its modules, its metadata, and the base it was made for."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    base: BaseModelRef | None = None

    @property
    def components(self) -> set[str]:
        return {key.split(".", 1)[0] for key in self.modules}

    @property
    def ranks(self) -> set[int]:
        return {module.rank for module in self.modules.values()}

    @property
    def nbytes(self) -> int:
        return sum(module.nbytes for module in self.modules.values())
