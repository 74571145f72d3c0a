"""The canonical in-memory form every adapter format normalizes to.

A module key names one weight-bearing layer of the base model as
``<component>.<module path>``, with diffusers / transformers module paths:
``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` or
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``. The base model is
described to this package only as a map of such keys to weight shapes.

An adapter maps module keys to one update each, of one of four kinds; every kind
computes its dense weight update ``delta()`` (the math of LyCORIS' ``functional``
modules, alpha/rank scale included):

- ``LoraModule`` (LoRA, LoCon; a LoCon Tucker ``lora_mid`` is folded into ``down``
  when the file is read): low-rank, ``delta = alpha/r * up @ down``;
- ``LohaModule`` (LoHa, optionally Tucker): ``delta = alpha/r * (w1_a @ w1_b) * (w2_a @ w2_b)``;
- ``LokrModule`` (LoKr): ``delta = alpha/r * kron(w1, w2)``, each factor full or a
  low-rank pair (w2 optionally Tucker); with no low-rank factor the scale is 1;
- ``DiffModule`` (LyCORIS ``full``): the whole weight difference, and optionally a
  bias difference.

Any kind but a diff may carry a DoRA magnitude (``DoraScale``), which rescales
the updated weight instead of adding to it: ``W = m * (W0 + delta) / ||W0 + delta||``
on one axis (per output row or per input channel). ``adapters.blend`` holds how
weights and blends combine them.

"rank" is the network dim the adapter was made with: the inner dimension of its
low-rank factors (LoRA's r; LoHa's r, whose Hadamard product can reach rank r^2;
LoKr's r of its low-rank factor). A diff, and a LoKr whose two factors are full
matrices, have no such factors (``factored`` is False); their ``rank`` is the
weight's smaller dimension, the most their update can have.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# A base model as this package sees it: module key -> weight shape,
# (out, in) for a linear layer, (out, in, kh, kw) for a conv layer.
ModuleShapes = Mapping[str, tuple[int, ...]]

# Added to a DoRA norm before dividing, as LyCORIS, A1111 and ComfyUI do (float32 eps).
DORA_EPS = float(torch.finfo(torch.float32).eps)
DORA_AXES = ("out", "in")


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def matrix_shape(shape: Iterable[int]) -> tuple[int, int]:
    """A weight shape as the matrix the update math uses: ``(out, in * kh * kw)``."""
    shape = tuple(int(d) for d in shape)
    return shape[0], math.prod(shape[1:])


@dataclass(frozen=True)
class DoraScale:
    """DoRA's magnitude: the updated weight is rescaled to ``magnitude`` along ``axis``.

    ``axis`` ``"out"``: one norm per output row (LyCORIS >= 3.2, ``wd_on_output``, its
    default); ``"in"``: one norm per input channel, taken over the output and kernel
    dimensions (LyCORIS before 3.2, A1111, ComfyUI). ``magnitude`` is 1-D: ``(out,)``
    or ``(in,)``.
    """

    magnitude: torch.Tensor
    axis: str

    def __post_init__(self) -> None:
        if self.axis not in DORA_AXES:
            raise ValueError(f"DoRA axis must be one of {DORA_AXES}, is {self.axis!r}")

    @property
    def nbytes(self) -> int:
        return _nbytes(self.magnitude)

    def shaped(self, weight_shape: tuple[int, ...]) -> torch.Tensor:
        """The magnitude as LyCORIS stores it: ``(out, 1, ...)`` or ``(1, in, 1, ...)``."""
        ones = [1] * (len(weight_shape) - 2)
        if self.axis == "out":
            return self.magnitude.reshape(-1, 1, *ones)
        return self.magnitude.reshape(1, -1, *ones)

    def norm(self, weight: torch.Tensor, channels: int) -> torch.Tensor:
        """The norms of ``weight`` (a matrix ``(out, n)``, ``n = channels * kernel``) on this axis,
        plus the eps: ``(out, 1)`` per row, or ``(1, n)`` per input channel repeated over its kernel."""
        out, n = weight.shape
        if self.axis == "out":
            return weight.norm(dim=1, keepdim=True) + DORA_EPS
        kernel = n // channels
        norms = torch.linalg.vector_norm(weight.reshape(out, channels, kernel), dim=(0, 2)) + DORA_EPS
        return norms.repeat_interleave(kernel).reshape(1, n)

    def broadcast(self, out: int, n: int, channels: int) -> torch.Tensor:
        """The magnitude laid out like ``norm``'s result."""
        magnitude = self.magnitude.to(torch.float32)
        if self.axis == "out":
            return magnitude.reshape(out, 1)
        return magnitude.repeat_interleave(n // channels).reshape(1, n)


class AdapterModule:
    """What every module kind offers (see the module docstring)."""

    kind: ClassVar[str]
    dora: DoraScale | None
    bias: torch.Tensor | None = None

    @property
    def weight_shape(self) -> tuple[int, ...]:  # pragma: no cover - every kind overrides
        raise NotImplementedError

    # False: ``weight_shape`` is only ``(out, in * kh * kw)`` (factors stored flattened, as LyCORIS
    # does for a LoHa or LoKr conv without Tucker); the base weight then fixes the kernel.
    exact_shape: ClassVar[bool] = True

    @property
    def rank(self) -> int:  # pragma: no cover
        raise NotImplementedError

    @property
    def factored(self) -> bool:
        return True

    @property
    def tensors(self) -> tuple[torch.Tensor | None, ...]:  # pragma: no cover
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return (
            _nbytes(*self.tensors) + (self.dora.nbytes if self.dora is not None else 0) + _nbytes(self.bias)
        )

    @property
    def label(self) -> str:
        """The name users know this kind by: LoRA, LoCon, LoHa, LoKr or diff."""
        return self.kind

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether this module updates a weight of ``shape``."""
        shape = tuple(int(d) for d in shape)
        if self.exact_shape or len(self.weight_shape) == len(shape):
            return self.weight_shape == shape
        return matrix_shape(self.weight_shape) == matrix_shape(shape)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update as a matrix ``(out, in * kh * kw)``, scale included, DoRA not."""
        raise NotImplementedError  # pragma: no cover

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight update, shaped like ``weight_shape`` (DoRA's rescale not included)."""
        return self.matrix(dtype).reshape(self.weight_shape)


@dataclass(frozen=True)
class LoraModule(AdapterModule):
    """One low-rank update: ``delta_W = scale * up @ down``.

    ``down`` (A) is ``(rank, in)`` for a linear layer or ``(rank, in, kh, kw)`` for a conv layer
    (LoCon; a Tucker ``lora_mid`` is folded into it); ``up`` (B) is ``(out, rank)`` or
    ``(out, rank, 1, 1)``.
    """

    kind: ClassVar[str] = "lora"

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    dora: DoraScale | None = None

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
    def label(self) -> str:
        return "LoCon" if self.is_conv else "LoRA"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the base weight this module updates."""
        return (int(self.up.shape[0]), *(int(d) for d in self.down.shape[1:]))

    @property
    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.down, self.up)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        down = self.down.to(dtype).reshape(self.rank, -1)
        up = self.up.to(dtype).reshape(self.up.shape[0], self.rank)
        return (up @ down).mul_(self.scale)


def _tucker(core: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """LyCORIS' ``rebuild_tucker``: ``core (r1, r2, k...)``, ``left (r1, p)``, ``right (r2, q)``
    -> ``(p, q, k...)``."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core, left, right)


@dataclass(frozen=True)
class LohaModule(AdapterModule):
    """LoHa: ``delta_W = alpha / r * (W1) * (W2)`` (Hadamard product), ``r = w1_b.shape[0]``.

    Without Tucker: ``W1 = w1_a (out, r) @ w1_b (r, in * kh * kw)`` and the same for ``W2``
    (a conv's factors are flattened, so the base weight fixes the kernel). With Tucker
    (``t1``/``t2`` ``(r, r, kh, kw)``): ``W1 = tucker(t1, w1_a (r, out), w1_b (r, in))``.
    """

    kind: ClassVar[str] = "loha"

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    dora: DoraScale | None = None

    @property
    def label(self) -> str:
        return "LoHa"

    @property
    def tucker(self) -> bool:
        return self.t1 is not None

    @property
    def exact_shape(self) -> bool:  # type: ignore[override]
        return self.tucker

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.t1 is not None:
            return (int(self.w1_a.shape[1]), int(self.w1_b.shape[1]), *(int(d) for d in self.t1.shape[2:]))
        return (int(self.w1_a.shape[0]), int(self.w1_b.shape[1]))

    @property
    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2)

    def _half(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, dtype) -> torch.Tensor:
        if t is None:
            return a.to(dtype) @ b.to(dtype)
        return _tucker(t.to(dtype), a.to(dtype), b.to(dtype)).reshape(a.shape[1], -1)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        first = self._half(self.w1_a, self.w1_b, self.t1, dtype)
        second = self._half(self.w2_a, self.w2_b, self.t2, dtype)
        return first.mul_(second).mul_(self.scale)


@dataclass(frozen=True)
class LokrModule(AdapterModule):
    """LoKr: ``delta_W = scale * kron(W1, W2)``.

    ``W1`` is ``w1 (a, c)`` or ``w1_a (a, r) @ w1_b (r, c)``; ``W2`` is ``w2 (b, d)`` /
    ``(b, d, kh, kw)``, or ``w2_a (b, r) @ w2_b (r, d [* kh * kw])`` (or ``(r, d, kh, kw)``), or with Tucker
    ``tucker(t2 (r, r, kh, kw), w2_a (r, b), w2_b (r, d))``. ``scale = alpha / r`` with ``r``
    the inner dimension of the low-rank factor; 1 (alpha ignored) when both are full
    matrices, as LyCORIS does. The weight is ``(a * b, c * d [, kh, kw])``.
    """

    kind: ClassVar[str] = "lokr"

    alpha: float
    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    dora: DoraScale | None = None

    @property
    def label(self) -> str:
        return "LoKr"

    @property
    def factored(self) -> bool:
        return self.w1_b is not None or self.w2_b is not None

    @property
    def factor_rank(self) -> int | None:
        """``r`` of the low-rank factor (``w1_b`` first, as LyCORIS), ``None`` with two full matrices."""
        if self.w1_b is not None:
            return int(self.w1_b.shape[0])
        if self.w2_b is not None:
            return int(self.w2_b.shape[0])
        return None

    @property
    def scale(self) -> float:
        rank = self.factor_rank
        return 1.0 if rank is None else float(self.alpha) / rank

    @property
    def first_shape(self) -> tuple[int, int]:
        if self.w1 is not None:
            return int(self.w1.shape[0]), int(self.w1.shape[1])
        return int(self.w1_a.shape[0]), int(self.w1_b.shape[1])

    @property
    def second_shape(self) -> tuple[int, ...]:
        if self.w2 is not None:
            return tuple(int(d) for d in self.w2.shape)
        if self.t2 is not None:
            return (int(self.w2_a.shape[1]), int(self.w2_b.shape[1]), *(int(d) for d in self.t2.shape[2:]))
        return (int(self.w2_a.shape[0]), *(int(d) for d in self.w2_b.shape[1:]))

    @property
    def exact_shape(self) -> bool:  # type: ignore[override]
        # LyCORIS' module writes a conv's w2_b flattened (r, d * kh * kw); its functional API (r, d, kh, kw).
        return self.w2 is not None or self.t2 is not None or self.w2_b.dim() > 2

    @property
    def weight_shape(self) -> tuple[int, ...]:
        (a, c), (b, d, *kernel) = self.first_shape, self.second_shape
        return (a * b, c * d, *kernel)

    @property
    def rank(self) -> int:
        rank = self.factor_rank
        return min(matrix_shape(self.weight_shape)) if rank is None else rank

    @property
    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b, self.t2)

    def first(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.w1 is not None:
            return self.w1.to(dtype)
        return self.w1_a.to(dtype) @ self.w1_b.to(dtype)

    def second(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W2`` as a matrix ``(b, d * kh * kw)``."""
        if self.w2 is not None:
            return self.w2.to(dtype).reshape(self.w2.shape[0], -1)
        if self.t2 is not None:
            rebuilt = _tucker(self.t2.to(dtype), self.w2_a.to(dtype), self.w2_b.to(dtype))
            return rebuilt.reshape(rebuilt.shape[0], -1)
        return self.w2_a.to(dtype) @ self.w2_b.to(dtype).reshape(self.w2_b.shape[0], -1)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # kron of the (a, c) and (b, d * k) matrices is the 4-D kron laid out as (a*b, c*d*k).
        out = torch.kron(self.first(dtype), self.second(dtype))
        return out.mul_(self.scale) if self.scale != 1.0 else out


@dataclass(frozen=True)
class DiffModule(AdapterModule):
    """A whole weight difference (LyCORIS ``full``: ``diff``), and optionally its bias difference."""

    kind: ClassVar[str] = "diff"

    diff: torch.Tensor
    bias: torch.Tensor | None = None
    dora: DoraScale | None = None  # never set: a diff has no magnitude

    @property
    def label(self) -> str:
        return "diff"

    @property
    def factored(self) -> bool:
        return False

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.diff.shape)

    @property
    def rank(self) -> int:
        return min(matrix_shape(self.weight_shape))

    @property
    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.diff,)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.diff.to(dtype).reshape(self.diff.shape[0], -1).clone()


Module = LoraModule | LohaModule | LokrModule | DiffModule

# The order kinds are named in (``describe``).
KIND_ORDER = ("LoRA", "LoCon", "LoHa", "LoKr", "diff")


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

    modules: dict[str, Module]
    metadata: dict[str, str] = field(default_factory=dict)
    base: BaseModelRef | None = None

    @property
    def components(self) -> set[str]:
        return {key.split(".", 1)[0] for key in self.modules}

    @property
    def ranks(self) -> set[int]:
        """The network dims of its factored modules; with none, the full ranks of its modules."""
        factored = {module.rank for module in self.modules.values() if module.factored}
        return factored or {module.rank for module in self.modules.values()}

    @property
    def nbytes(self) -> int:
        return sum(module.nbytes for module in self.modules.values())

    @property
    def is_low_rank(self) -> bool:
        """Plain LoRA / LoCon without DoRA: every module a low-rank pair that adds to the weight."""
        return all(isinstance(m, LoraModule) and m.dora is None for m in self.modules.values())

    @property
    def kind(self) -> str:
        """What it is, as users name it: ``LoRA``, ``LoCon``, ``LoHa``, ``LoKr``, ``diff``, several
        joined with ``+``, and ``DoRA (...)`` when its modules carry a DoRA magnitude."""
        return describe(self.modules.values())


def describe(modules: Iterable[Module]) -> str:
    modules = list(modules)
    labels = {module.label for module in modules}
    if "LoCon" in labels:
        labels.discard("LoRA")  # a LoCon file has linear layers too
    text = " + ".join(label for label in KIND_ORDER if label in labels) or "empty"
    if any(module.dora is not None for module in modules):
        return "DoRA" if text == "LoRA" else f"DoRA ({text})"
    return text
