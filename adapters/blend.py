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
blend's per-module ``Update`` (a stacked ``LowRank`` pair, or a ``Dense`` delta
for merges that are not linear) and ``add_update``, which computes
``W0 + update`` from the pristine weight into a buffer (half-precision weights in
float32, rounded once).

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

from adapters.canonical import LoraAdapter, LoraModule
from adapters.errors import AdapterIncompatible, InvalidArgument

Weighted = Sequence[tuple[LoraAdapter, float]]


@dataclass(frozen=True)
class BlendEntry:
    """One adapter in a blend: its key (the blob's sha256, or any stable name) and weight."""

    key: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.key:
            raise InvalidArgument("a blend entry needs an adapter key")
        if not math.isfinite(self.weight):
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
    def of(cls, pairs: Iterable[tuple[str, float]], merge: Merge = LINEAR) -> Blend:
        """A blend from (key, weight) pairs; a key listed twice (two names for one blob) has its
        weights summed, which is the same update; a zero total weight drops the key."""
        merged: dict[str, float] = {}
        for key, weight in pairs:
            merged[key] = merged.get(key, 0.0) + float(weight)
        entries = tuple(BlendEntry(key, weight) for key, weight in merged.items() if weight != 0.0)
        return cls(entries, merge if entries else LINEAR)

    @property
    def signature(self) -> tuple[tuple[str, float], ...]:
        """The sorted (key, weight) pairs, plus the merge when it is not linear: the identity of
        the blend's resulting weights (``()``: the base model alone)."""
        pairs = tuple(sorted((entry.key, float(entry.weight)) for entry in self.entries))
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


Update = LowRank | Dense


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
    than ``base`` (a bf16 runtime buffer over float32 weights).
    """
    rows = base.shape[0]
    base = base if base.is_contiguous() else base.contiguous()
    if out is None:
        out = torch.empty_like(base, memory_format=torch.contiguous_format)
    matrix, target = base.view(rows, -1), out.view(rows, -1)
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


def _members(adapters: Weighted, key: str) -> list[tuple[LoraModule, float]]:
    members = [
        (adapter.modules[key], float(weight)) for adapter, weight in adapters if key in adapter.modules
    ]
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
