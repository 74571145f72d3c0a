"""Blending math: several adapters with weights into one update per module.

A blend is a set of (adapter, weight) pairs, negative weights allowed. Two
equivalent exact forms of the weighted linear blend
``delta_W = sum_i w_i * scale_i * B_i @ A_i``:

- dense deltas, one module at a time (``iter_blend_deltas`` yields each as it is
  computed, so at most one dense module delta is alive at once);
- stacked low-rank factors (``stack_factors``): ``A = cat_i A_i`` (rows) and
  ``B = cat_i w_i * scale_i * B_i`` (columns), with ``alpha = rank`` (scale 1).
  Nothing dense is ever built; ``B @ A`` equals the blend.

The engine and the runtime backends write blends through this module too: a
blend's per-module ``Update`` (a stacked ``LowRank`` pair; a ``Dense`` delta for
merges that are not linear and for the kinds that are not low-rank; ``Rescaled``
when a DoRA adapter rescales the result) and ``add_update``, which computes
``W0 + update`` (times the rescale) from the pristine weight into a buffer
(half-precision weights in float32, rounded once).

Every adapter kind (``adapters.canonical``) is laid out once per module as a
``PreparedModule`` (``prepare_module``): a low-rank pair, or its dense update
(LoHa, LoKr, diff), plus DoRA's magnitude and a bias difference when it has them.
``combine`` turns a blend's members of one module into its ``Update``:

- members without DoRA add ``w_i * delta_i`` (low-rank pairs stay stacked unless a
  dense member makes the sum dense);
- a DoRA member's update enters at full strength and its weight scales its rescale,
  as LyCORIS merges it (``W = V * (w * (m / ||V|| - 1) + 1)``, ``V = W0 + delta``); in a
  blend ``V`` is the blended weight ``W0 + sum_i w_i delta_i + sum_j delta_j`` (DoRA
  members j at full strength) and the rescales add: ``W = V * (1 + sum_j w_j (m_j /
  ||V||_j - 1))``, each norm on its member's axis. With one DoRA member this is LyCORIS'
  merge of the other adapters first and the DoRA adapter last.

Per-part weights (``PartWeights``: A1111's ``<lora:name:te:unet>``) give an adapter one
weight for the text encoders and another for the UNet; its signature entries are then
``<key>#te`` and ``<key>#unet`` (one plain ``<key>`` entry when they are equal), so equal
blends keep one signature and one plan.

TIES and DARE merges work on the dense per-module deltas (the "task tensors"),
with the semantics of ``peft.utils.merge_utils`` (``ties``, ``dare_linear``,
``dare_ties``), which LoRAX's merge strategies also use. DARE is random; it takes
a seed so the same blend always gives the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from adapters.canonical import DoraScale, LoraAdapter, LoraModule, Module, matrix_shape
from adapters.errors import AdapterIncompatible, InvalidArgument
from adapters.weights import (
    PART_SEPARATOR,
    TEXT_ENCODER_PART,
    UNET_PART,
    PartWeights,
    Weight,
    add_weights,
    as_weight,
    is_zero,
    part_of,
    parts_of,
    weight_for,
    weight_pairs,
)

__all__ = [
    "LINEAR",
    "MERGE_KEY_PREFIX",
    "MERGE_METHODS",
    "PART_SEPARATOR",
    "TEXT_ENCODER_PART",
    "UNET_PART",
    "Blend",
    "BlendEntry",
    "Dense",
    "LowRank",
    "Merge",
    "PartWeights",
    "PreparedModule",
    "Rescaled",
    "Update",
    "Weight",
    "Weighted",
    "add_update",
    "add_weights",
    "as_weight",
    "blend_delta",
    "blend_deltas",
    "combine",
    "combine_bias",
    "dare_merge",
    "is_zero",
    "iter_blend_deltas",
    "merge_tasks",
    "merged_update",
    "module_keys",
    "part_of",
    "parts_of",
    "prepare_module",
    "stack_factors",
    "stack_low_rank",
    "stacked_adapter",
    "ties_merge",
    "weight_for",
    "weight_pairs",
]

Weighted = Sequence[tuple[LoraAdapter, float]]


@dataclass(frozen=True)
class BlendEntry:
    """One adapter in a blend: its key (the blob's sha256, or any stable name) and weight
    (a float, or ``PartWeights``)."""

    key: str
    weight: Weight = 1.0

    def __post_init__(self) -> None:
        if not self.key:
            raise InvalidArgument("a blend entry needs an adapter key")
        if not isinstance(self.weight, PartWeights) and not math.isfinite(self.weight):
            raise InvalidArgument(f"blend weight of {self.key!r} must be finite, is {self.weight}")


MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
MERGE_KEY_PREFIX = "merge:"


@dataclass(frozen=True)
class Merge:
    """How a blend's adapters combine: ``linear`` (the weighted sum), or ``ties``, ``dare_linear``,
    ``dare_ties`` on dense per-module deltas (PEFT's ``merge_utils`` semantics), keeping
    ``density`` of each delta. DARE's random masks come from ``seed``."""

    method: str = "linear"
    density: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise InvalidArgument(f"unknown merge {self.method!r}: use one of {', '.join(MERGE_METHODS)}")
        if not math.isfinite(self.density) or not 0.0 < self.density <= 1.0:
            raise InvalidArgument(f"merge density must be in (0, 1], is {self.density}")

    @classmethod
    def asked(cls, method: str = "", density: float = 0.0, seed: int | None = None) -> Merge:
        """The merge a request asks for, with the wire's defaults: ``""`` is linear (which ignores
        density and seed), density 0 is 0.5, the seed counts for DARE only."""
        method = method or "linear"
        if method == "linear":
            return LINEAR
        if not math.isfinite(density) or density < 0.0:
            raise InvalidArgument(f"merge density must be in (0, 1], is {density}")
        seed = int(seed or 0) if method.startswith("dare") else 0
        return cls(method, float(density) or 0.5, seed)

    @property
    def is_linear(self) -> bool:
        return self.method == "linear"

    @property
    def key(self) -> tuple[str, float]:
        """This merge as one signature entry (a key no sha256 can collide with)."""
        return (f"{MERGE_KEY_PREFIX}{self.method}:{self.seed}", float(self.density))


LINEAR = Merge()


@dataclass(frozen=True)
class Blend:
    """A set of weighted adapters and how they merge. Equal signatures mean equal weights."""

    entries: tuple[BlendEntry, ...] = ()
    merge: Merge = LINEAR

    def __post_init__(self) -> None:
        keys = [entry.key for entry in self.entries]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise InvalidArgument(f"a blend lists the same adapter more than once: {', '.join(duplicates)}")

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, Weight]], merge: Merge = LINEAR) -> Blend:
        """A blend from (key, weight) pairs; a key listed twice (two names for one blob) has its
        weights summed, which is the same update; a zero total weight drops the key."""
        merged: dict[str, Weight] = {}
        for key, weight in pairs:
            merged[key] = add_weights(merged[key], weight) if key in merged else as_weight(weight)
        entries = tuple(BlendEntry(key, weight) for key, weight in merged.items() if not is_zero(weight))
        return cls(entries, merge if entries else LINEAR)

    @property
    def signature(self) -> tuple[tuple[str, float], ...]:
        """The sorted (key, weight) pairs, plus the merge when it is not linear: the identity of
        the blend's resulting weights (``()``: the base model alone). An entry with per-part
        weights gives ``key#te`` and ``key#unet`` pairs (``weight_pairs``)."""
        pairs = tuple(
            sorted(pair for entry in self.entries for pair in weight_pairs(entry.key, entry.weight))
        )
        return pairs if self.merge.is_linear or not pairs else (*pairs, self.merge.key)

    @property
    def is_empty(self) -> bool:
        return not self.entries

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True)
class LowRank:
    """``B @ A`` with the weights folded into ``B``: ``down`` (r, in*k*k), ``up`` (out, r)."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def nbytes(self) -> int:
        return _nbytes(self.down) + _nbytes(self.up)


@dataclass(frozen=True)
class Dense:
    """A whole delta as a matrix (out, in*k*k): merges that are not linear, non-low-rank formats."""

    delta: torch.Tensor

    @property
    def nbytes(self) -> int:
        return _nbytes(self.delta)


@dataclass(frozen=True)
class Rescaled:
    """``(W0 + inner) * scale``: DoRA's rescale of the blended weight. ``scale`` (float32) broadcasts
    over the weight as a matrix: ``(out, 1)`` per row, ``(1, in*k*k)`` per input channel, or
    ``(out, in*k*k)`` when DoRA members of both axes meet."""

    inner: LowRank | Dense
    scale: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes + _nbytes(self.scale)


Update = LowRank | Dense | Rescaled


def stack_low_rank(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> LowRank:
    """One low-rank pair for several weighted ``(down, up, weight)`` pairs of one module.

    ``A`` rows are stacked and ``B`` columns carry the weights, so ``B @ A`` is the
    weighted sum of the members' ``B_i @ A_i`` (nothing dense is built).
    """
    down = torch.cat([d for d, _, _ in parts], dim=0)
    up = torch.cat([u * w for _, u, w in parts], dim=1)
    return LowRank(down, up)


def add_update(base: torch.Tensor, update: Update, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W0 + update`` for one weight (viewed as a matrix), into ``out`` or a new tensor.

    ``base`` is never written. Weights in a half precision are computed in float32 and
    rounded once (within 1 ulp of the exact blend); ``out`` may have another dtype
    than ``base`` (a bf16 runtime buffer over float32 weights). A ``Rescaled`` update is
    ``(W0 + inner) * scale``, computed the same way.
    """
    rows = base.shape[0]
    base = base if base.is_contiguous() else base.contiguous()
    if out is None:
        out = torch.empty_like(base, memory_format=torch.contiguous_format)
    matrix, target = base.view(rows, -1), out.view(rows, -1)
    if isinstance(update, Rescaled):
        if base.dtype == out.dtype == update.scale.dtype:
            add_update(base, update.inner, out)
            target.mul_(update.scale)
        else:
            target.copy_(add_update(matrix.to(torch.float32), update.inner).mul_(update.scale.float()))
        return out
    if isinstance(update, LowRank):
        up, down = update.up, update.down
        if up.dtype == base.dtype == out.dtype:
            torch.addmm(matrix, up, down, out=target)
        else:
            target.copy_(torch.addmm(matrix.to(torch.float32), up.float(), down.float()))
        return out
    delta = update.delta.reshape(rows, -1)
    if delta.dtype == base.dtype == out.dtype:
        torch.add(matrix, delta, out=target)
    else:
        target.copy_(matrix.to(torch.float32) + delta.float())
    return out


@dataclass(frozen=True)
class PreparedModule:
    """One adapter's update of one weight, laid out for blending: the weight as a matrix
    ``(out, n)``, ``n = in * kh * kw``.

    Exactly one of ``low_rank`` (``down (r, n)``, ``up * scale (out, r)``: LoRA, LoCon) and
    ``dense`` (the update itself: LoHa, LoKr, diff) is set. ``dora``: DoRA's magnitude, with
    ``channels`` (the weight's input channels) for its per-channel norm. ``bias``: a bias
    difference ``(out,)``.
    """

    low_rank: LowRank | None = None
    dense: torch.Tensor | None = None
    dora: DoraScale | None = None
    channels: int = 0
    bias: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        held = self.low_rank.nbytes if self.low_rank is not None else 0
        for tensor in (self.dense, self.bias, None if self.dora is None else self.dora.magnitude):
            held += _nbytes(tensor) if tensor is not None else 0
        return held

    def delta(self) -> torch.Tensor:
        """The dense update (float32 matrix), DoRA's rescale not included."""
        if self.dense is not None:
            return self.dense.float()
        return self.low_rank.up.float() @ self.low_rank.down.float()

    def task(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """What this adapter changes at full strength (a merge's task tensor): its update, or for
        DoRA ``rescaled(W0 + delta) - W0``, which needs the base weight matrix ``base``."""
        delta = self.delta()
        if self.dora is None:
            return delta
        if base is None:
            raise InvalidArgument("a DoRA update depends on the base weight; pass it")
        weight = base.float() + delta
        out, n = weight.shape
        scale = self.dora.broadcast(out, n, self.channels).to(weight.device) / self.dora.norm(
            weight, self.channels
        )
        return weight.mul_(scale).sub_(base.float())


def prepare_module(
    module: Module, shape: tuple[int, ...], *, device=None, dtype: torch.dtype = torch.float32
) -> PreparedModule:
    """``module`` laid out for a weight of ``shape`` on ``device``.

    A low-rank pair keeps ``dtype`` (the weight's; ``up`` carries the scale); a dense update
    is float32 (computed from the factors once, here), as are DoRA's magnitude and a bias. A
    LoRA whose factors hold more values than the weight (a rank above the weight's smaller
    dimension) is kept as its dense update too: the same update, in fewer bytes.
    """
    out, n = matrix_shape(shape)
    dora = module.dora
    if dora is not None:
        dora = DoraScale(
            _owned(dora.magnitude.to(device=device, dtype=torch.float32), dora.magnitude), dora.axis
        )
    bias = (
        None
        if module.bias is None
        else _owned(module.bias.to(device=device, dtype=torch.float32), module.bias)
    )
    channels = int(shape[1])
    if isinstance(module, LoraModule) and module.rank * (out + n) <= out * n:
        rank = module.rank
        down = _owned(module.down.reshape(rank, -1).to(device=device, dtype=dtype).contiguous(), module.down)
        up = module.up.reshape(module.up.shape[0], rank).to(device=device, dtype=torch.float32)
        up = (up * module.scale).to(dtype).contiguous()
        return PreparedModule(low_rank=LowRank(down, up), dora=dora, channels=channels, bias=bias)
    source = module if device is None else _on(module, device)
    dense = source.matrix(torch.float32).reshape(out, n).contiguous()
    return PreparedModule(dense=dense, dora=dora, channels=channels, bias=bias)


def _owned(tensor: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied when it still shares ``source``'s memory: a file's tensors are views on
    the file's bytes (``adapters.safeparse``), and a cached adapter should hold its own bytes, not
    keep the whole file alive."""
    return tensor.clone() if tensor.data_ptr() == source.data_ptr() else tensor


def _on(module: Module, device) -> Module:
    """The module's factors on ``device`` (a dense update is built where the weight lives)."""
    from dataclasses import fields, replace

    moved = {
        f.name: getattr(module, f.name).to(device)
        for f in fields(module)
        if isinstance(getattr(module, f.name), torch.Tensor)
    }
    return replace(module, **moved)


def combine(members: Sequence[tuple[PreparedModule, float]], base: torch.Tensor | None = None) -> Update:
    """One module's ``Update`` for a linear blend of ``members`` (``(prepared, weight)``).

    ``base`` (the pristine weight) is needed only when a member has DoRA; see the module
    docstring for how DoRA members combine. Low-rank members stay one stacked pair unless a
    dense member (or DoRA) makes the update dense or rescaled.
    """
    doras = [(prepared, weight) for prepared, weight in members if prepared.dora is not None]
    # A DoRA member's update enters at full strength; its weight scales its rescale (LyCORIS).
    strength = [(p, 1.0 if p.dora is not None else float(w)) for p, w in members]
    lows = [(p.low_rank.down, p.low_rank.up, w) for p, w in strength if p.low_rank is not None]
    denses = [(p.dense, w) for p, w in strength if p.dense is not None]
    inner: LowRank | Dense
    if not denses:
        inner = stack_low_rank(lows)
    else:
        total = denses[0][0] * denses[0][1]
        for dense, weight in denses[1:]:
            total.add_(dense, alpha=weight)
        for down, up, weight in lows:
            total.addmm_(up.to(total.dtype), down.to(total.dtype), alpha=weight)
        inner = Dense(total)
    if not doras:
        return inner
    if base is None:
        raise InvalidArgument("a DoRA update depends on the base weight; pass it")
    blended = add_update(base.float().reshape(base.shape[0], -1), inner)
    return Rescaled(inner, _dora_scale(doras, blended))


def _dora_scale(doras: Sequence[tuple[PreparedModule, float]], weight: torch.Tensor) -> torch.Tensor:
    """``1 + sum_j w_j (m_j / ||V||_j - 1)`` (LyCORIS' ``w * (m / ||V|| - 1) + 1`` for one member)."""
    out, n = weight.shape
    total: torch.Tensor | None = None
    for prepared, weight_j in doras:
        dora = prepared.dora
        term = dora.broadcast(out, n, prepared.channels).to(weight.device) / dora.norm(
            weight, prepared.channels
        )
        if len(doras) == 1:
            return term if weight_j == 1.0 else term.sub_(1.0).mul_(weight_j).add_(1.0)
        term = term.sub_(1.0).mul_(weight_j)
        total = term if total is None else total + term
    return total.add_(1.0)


def combine_bias(members: Sequence[tuple[PreparedModule, float]]) -> torch.Tensor | None:
    """The blend's bias difference of one module (``sum_i w_i * db_i``), ``None`` when no member has one."""
    total: torch.Tensor | None = None
    for prepared, weight in members:
        if prepared.bias is not None:
            part = prepared.bias * float(weight)
            total = part if total is None else total.add_(part)
    return total


def merged_update(
    members: Sequence[tuple[PreparedModule | None, float]],
    merge: Merge,
    base: torch.Tensor,
    generator: torch.Generator | None = None,
) -> Dense:
    """One module's TIES/DARE merge: each member's task tensor (zeros where an adapter lacks the
    module; DoRA's at full strength) merged with the weights (``merge_tasks``)."""
    matrix = base.float().reshape(base.shape[0], -1)
    tasks = [
        prepared.task(matrix) if prepared is not None else torch.zeros_like(matrix) for prepared, _ in members
    ]
    weights = torch.tensor([float(w) for _, w in members], dtype=torch.float32, device=matrix.device)
    return Dense(merge_tasks(torch.stack(tasks), weights, merge, generator))


def merge_tasks(
    tasks: torch.Tensor, weights: torch.Tensor, merge: Merge, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One module's merged delta from its stacked per-adapter deltas (``tasks``) and weights."""
    if merge.is_linear:
        return (tasks * weights.view(-1, *([1] * (tasks.dim() - 1)))).sum(dim=0)
    if merge.method == "ties":
        pruned = torch.stack([_magnitude_prune(t, merge.density) for t in tasks])
        return _disjoint_merge(pruned, weights, "total")
    if generator is None:
        generator = torch.Generator().manual_seed(merge.seed)
    pruned = torch.stack([_random_prune(t, merge.density, generator) for t in tasks])
    if merge.method == "dare_ties":
        return _disjoint_merge(pruned, weights, "total")
    return (pruned * weights.view(-1, *([1] * (pruned.dim() - 1)))).sum(dim=0)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def module_keys(adapters: Weighted) -> list[str]:
    """Every module any adapter of the blend touches, in first-seen order."""
    seen: dict[str, None] = {}
    for adapter, _ in adapters:
        seen.update(dict.fromkeys(adapter.modules))
    return list(seen)


def _members(adapters: Weighted, key: str) -> list[tuple[Module, float]]:
    members = [
        (adapter.modules[key], float(weight)) for adapter, weight in adapters if key in adapter.modules
    ]
    for module, _ in members:
        if module.dora is not None:
            raise InvalidArgument(
                f"module {key!r} is DoRA, whose update depends on the base weight: blend it with "
                "prepare_module and combine"
            )
    shapes = {module.weight_shape for module, _ in members}
    if len(shapes) > 1:
        raise AdapterIncompatible(
            f"the blended adapters disagree on the shape of {key!r}: {sorted(shapes)}; they were made "
            "for different base models"
        )
    return members


def blend_delta(adapters: Weighted, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The dense blended update of one module, or ``None`` when no adapter touches it."""
    total: torch.Tensor | None = None
    for module, weight in _members(adapters, key):
        if not isinstance(module, LoraModule):
            part = module.matrix(dtype).mul_(weight)
            total = part if total is None else total.add_(part)
            continue
        down = module.down.to(dtype).reshape(module.rank, -1)
        up = module.up.to(dtype).reshape(module.up.shape[0], module.rank)
        factor = weight * module.scale
        if total is None:
            total = (up @ down).mul_(factor)
        else:
            total.addmm_(up, down, alpha=factor)
    return None if total is None else total.reshape(_members(adapters, key)[0][0].weight_shape)


def iter_blend_deltas(
    adapters: Weighted, dtype: torch.dtype = torch.float32, keys: Iterable[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module key, dense delta)`` for every touched module, one at a time."""
    for key in module_keys(adapters) if keys is None else keys:
        delta = blend_delta(adapters, key, dtype)
        if delta is not None:
            yield key, delta


def blend_deltas(adapters: Weighted, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All dense blended deltas at once (prefer ``iter_blend_deltas`` for large models)."""
    return dict(iter_blend_deltas(adapters, dtype))


def stack_factors(adapters: Weighted, dtype: torch.dtype | None = None) -> dict[str, LoraModule]:
    """The blend as one low-rank module per key: factors concatenated, weights folded into B.

    The result's rank per module is the sum of the members' ranks and its scale is 1,
    so ``LoraModule.delta()`` of it equals ``blend_delta``. ``dtype`` defaults to the
    widest member dtype.
    """
    stacked: dict[str, LoraModule] = {}
    for key in module_keys(adapters):
        members = _members(adapters, key)
        if not all(isinstance(m, LoraModule) for m, _ in members):
            raise InvalidArgument(
                f"module {key!r} is not low-rank in every adapter; stack_factors stacks LoRA/LoCon only"
            )
        target = dtype or _widest([m.down.dtype for m, _ in members] + [m.up.dtype for m, _ in members])
        pair = stack_low_rank(
            [(m.down.to(target), m.up.to(target), weight * m.scale) for m, weight in members]
        )
        stacked[key] = LoraModule(down=pair.down, up=pair.up, alpha=float(pair.down.shape[0]))
    return stacked


def stacked_adapter(adapters: Weighted, dtype: torch.dtype | None = None) -> LoraAdapter:
    """``stack_factors`` wrapped as an adapter (base taken from the members when they agree)."""
    bases = {adapter.base for adapter, _ in adapters}
    return LoraAdapter(modules=stack_factors(adapters, dtype), base=bases.pop() if len(bases) == 1 else None)


def _widest(dtypes: list[torch.dtype]) -> torch.dtype:
    return torch.float32 if torch.float32 in dtypes or len(set(dtypes)) > 1 else dtypes[0]


def _task_tensors(adapters: Weighted, key: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked per-adapter deltas (zeros where an adapter lacks the module) and their weights."""
    members = [(adapter.modules.get(key), float(weight)) for adapter, weight in adapters]
    if any(module is not None and module.dora is not None for module, _ in members):
        raise InvalidArgument(f"module {key!r} is DoRA, whose update depends on the base weight")
    shapes = {module.weight_shape for module, _ in members if module is not None}
    if len(shapes) > 1:
        raise AdapterIncompatible(f"the merged adapters disagree on the shape of {key!r}: {sorted(shapes)}")
    shape = shapes.pop()
    deltas = [
        module.delta(dtype) if module is not None else torch.zeros(shape, dtype=dtype)
        for module, _ in members
    ]
    return torch.stack(deltas), torch.tensor([w for _, w in members], dtype=dtype)


def _check_density(density: float) -> None:
    if not 0.0 <= density <= 1.0:
        raise InvalidArgument(f"density must be in [0, 1], is {density}")


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest magnitudes (PEFT's ``magnitude_based_pruning``)."""
    if density >= 1:
        return tensor
    flat = tensor.reshape(-1)
    k = int(density * flat.numel())
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_prune(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each value with probability ``density``, rescaled by ``1/density`` (PEFT's ``random_pruning``)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def _disjoint_merge(
    tasks: torch.Tensor, weights: torch.Tensor, method: Literal["total", "frequency"]
) -> torch.Tensor:
    """Elect a sign per parameter, then average the weighted values that agree with it."""
    sign = tasks.sign()
    magnitude = tasks.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority = torch.where(magnitude >= 0, 1.0, -1.0).to(tasks.dtype)
    mask = sign == majority
    weighted = tasks * weights.view(-1, *([1] * (tasks.dim() - 1)))
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def ties_merge(
    adapters: Weighted,
    density: float = 0.5,
    majority_sign_method: Literal["total", "frequency"] = "total",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """TIES: trim each task delta to its top ``density`` magnitudes, elect signs, disjoint-merge."""
    _check_density(density)
    merged: dict[str, torch.Tensor] = {}
    for key in module_keys(adapters):
        tasks, weights = _task_tensors(adapters, key, dtype)
        tasks = torch.stack([_magnitude_prune(t, density) for t in tasks])
        merged[key] = _disjoint_merge(tasks, weights, majority_sign_method)
    return merged


def dare_merge(
    adapters: Weighted,
    density: float = 0.5,
    *,
    ties: bool = False,
    seed: int = 0,
    majority_sign_method: Literal["total", "frequency"] = "total",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """DARE: drop each delta value with probability ``1 - density`` and rescale the rest, then
    sum with weights (``dare_linear``) or elect signs and disjoint-merge (``ties=True``, ``dare_ties``).

    The random masks come from a generator seeded with ``seed``; modules are visited
    in ``module_keys`` order, adapters in blend order.
    """
    _check_density(density)
    generator = torch.Generator().manual_seed(seed)
    merged: dict[str, torch.Tensor] = {}
    for key in module_keys(adapters):
        tasks, weights = _task_tensors(adapters, key, dtype)
        tasks = torch.stack([_random_prune(t, density, generator) for t in tasks])
        if ties:
            merged[key] = _disjoint_merge(tasks, weights, majority_sign_method)
        else:
            merged[key] = (tasks * weights.view(-1, *([1] * (tasks.dim() - 1)))).sum(dim=0)
    return merged
