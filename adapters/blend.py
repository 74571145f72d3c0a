"""Blending math: several adapters with weights into one update per module.

A blend is a set of (adapter, weight) pairs, negative weights allowed. Two
equivalent exact forms of the weighted linear blend
``delta_W = sum_i w_i * scale_i * B_i @ A_i``:

- dense deltas, one module at a time (``iter_blend_deltas`` yields each as it is
  computed, so at most one dense module delta is alive at once);
- stacked low-rank factors (``stack_factors``): ``A = cat_i A_i`` (rows) and
  ``B = cat_i w_i * scale_i * B_i`` (columns), with ``alpha = rank`` (scale 1).
  Nothing dense is ever built; ``B @ A`` equals the blend.

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


@dataclass(frozen=True)
class Blend:
    """A set of weighted adapters. Equal signatures mean equal weights."""

    entries: tuple[BlendEntry, ...] = ()

    def __post_init__(self) -> None:
        keys = [entry.key for entry in self.entries]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise InvalidArgument(f"a blend lists the same adapter more than once: {', '.join(duplicates)}")

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, float]]) -> Blend:
        """A blend from (key, weight) pairs; a key listed twice (two names for one blob) has its
        weights summed, which is the same update."""
        merged: dict[str, float] = {}
        for key, weight in pairs:
            merged[key] = merged.get(key, 0.0) + float(weight)
        return cls(tuple(BlendEntry(key, weight) for key, weight in merged.items()))

    @property
    def signature(self) -> tuple[tuple[str, float], ...]:
        """The sorted tuple of (key, weight): the identity of the blend's resulting weights."""
        return tuple(sorted((entry.key, float(entry.weight)) for entry in self.entries))

    @property
    def is_empty(self) -> bool:
        return not self.entries

    def __len__(self) -> int:
        return len(self.entries)


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
        downs = [module.down.to(target) for module, _ in members]
        ups = [module.up.to(target) * (weight * module.scale) for module, weight in members]
        down, up = torch.cat(downs, dim=0), torch.cat(ups, dim=1)
        stacked[key] = LoraModule(down=down, up=up, alpha=float(down.shape[0]))
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
