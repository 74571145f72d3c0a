"""Fused hot-swap: a blend's weights are computed from pristine weights, never from the previous blend.

For every module a blend touches, ``W = W0 + update`` where the update is the
blend's stacked low-rank pair (``sum_i w_i * scale_i * B_i @ A_i`` as one
``addmm``) or, for TIES/DARE merges, its dense merged delta (``adapters.blend``
holds both forms and the arithmetic). ``W0`` is the base model's own weight
tensor, which is never written to again. A blend's weights are either
*materialized* (computed once and kept with the blend's plan, in the engine's
byte-bounded plan cache: a swap then only repoints each parameter, a few
microseconds per module) or written into a per-module scratch buffer on every
swap. Returning to the base repoints parameters at the untouched ``W0``
tensors, so A -> B -> A leaks nothing and the base comes back bit for bit.

Not thread-safe on its own: the engine calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from adapters.blend import LINEAR, Blend, Dense, Merge, Update, add_update, merge_tasks, stack_low_rank
from adapters.canonical import LoraAdapter
from adapters.errors import AdapterIncompatible
from server.engine.plan import BlendPlan, one_thread


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter's factors in the engine's layout: per module ``(A (r, in*k*k), B*scale (out, r))``."""

    name: str
    version: int
    sha256: str
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


class FusedWeights:
    """Owns the target weights of a pipeline and the blend currently written into them."""

    def __init__(self, targets: Mapping[str, nn.Module]) -> None:
        self._params: dict[str, nn.Parameter] = {key: module.weight for key, module in targets.items()}
        # The base's own tensors: never written to, so they stay the pristine W0.
        self._pristine: dict[str, torch.Tensor] = {key: p.data for key, p in self._params.items()}
        self._scratch: dict[str, torch.Tensor] = {}
        # key -> the tensor the parameter points at now, for modules not at W0.
        self._current: dict[str, torch.Tensor] = {}
        self.signature: tuple[tuple[str, float], ...] = ()

    @property
    def scratch_bytes(self) -> int:
        """Bytes of the per-module buffers used for blends that are not materialized."""
        return sum(_nbytes(t) for t in self._scratch.values())

    def materialized_bytes(self, plan: BlendPlan) -> int:
        """What materializing ``plan`` would hold: one copy of every weight it touches."""
        return sum(_nbytes(self._pristine[key]) for key in plan.updates)

    # ---------------------------------------------------------------- prepare

    def prepare(self, adapter: LoraAdapter, *, name: str, version: int, sha256: str) -> PreparedAdapter:
        """Check ``adapter`` against the weights and lay its factors out for ``addmm``."""
        unknown = sorted(key for key in adapter.modules if key not in self._pristine)
        if unknown:
            shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            raise AdapterIncompatible(
                f"adapter {name}@{version} targets modules the base model does not have ({shown}); "
                "it was made for another base model"
            )
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        nbytes = 0
        for key in sorted(adapter.modules):
            module = adapter.modules[key]
            weight = self._pristine[key]
            if tuple(weight.shape) != module.weight_shape:
                raise AdapterIncompatible(
                    f"adapter {name}@{version} module {key} updates a weight of shape "
                    f"{module.weight_shape}, the base model's is {tuple(weight.shape)}; "
                    "it was made for another base model"
                )
            rank = module.rank
            # Half-precision weights: factors stay float32, the blend is cast once in add_update.
            dtype = torch.float32 if weight.element_size() < 4 else weight.dtype
            down = module.down.reshape(rank, -1).to(device=weight.device, dtype=dtype)
            up = module.up.reshape(module.up.shape[0], rank).to(device=weight.device, dtype=torch.float32)
            up = (up * module.scale).to(dtype).contiguous()
            factors[key] = (down.contiguous(), up)
            nbytes += _nbytes(down) + _nbytes(up)
        return PreparedAdapter(name=name, version=version, sha256=sha256, factors=factors, nbytes=nbytes)

    def plan(self, entries: Sequence[tuple[PreparedAdapter, float]], merge: Merge = LINEAR) -> BlendPlan:
        """The per-module updates of ``entries`` (in signature order) combined by ``merge``."""
        blend = Blend.of(((prepared.sha256, weight) for prepared, weight in entries), merge)
        ordered = sorted(entries, key=lambda item: (item[0].sha256, item[1]))
        with one_thread():
            updates = _stacked(ordered) if blend.merge.is_linear else self._merged(ordered, blend.merge)
        return BlendPlan(blend.signature, updates, sum(u.nbytes for u in updates.values()))

    def _merged(self, ordered: Sequence[tuple[PreparedAdapter, float]], merge: Merge) -> dict[str, Update]:
        """Dense merged deltas, modules in sorted order (DARE's random stream follows it)."""
        generator = torch.Generator().manual_seed(merge.seed)
        weights = torch.tensor([float(w) for _, w in ordered], dtype=torch.float32)
        keys = sorted({key for prepared, _ in ordered for key in prepared.factors})
        updates: dict[str, Update] = {}
        for key in keys:
            rows = self._pristine[key].shape[0]
            tasks = []
            for prepared, _ in ordered:
                pair = prepared.factors.get(key)
                if pair is None:
                    tasks.append(torch.zeros(rows, self._pristine[key][0].numel()))
                else:
                    tasks.append(pair[1].float() @ pair[0].float())
            updates[key] = Dense(merge_tasks(torch.stack(tasks), weights, merge, generator))
        return updates

    # ---------------------------------------------------------------- apply

    @torch.no_grad()
    def materialize(self, plan: BlendPlan) -> None:
        """Compute and keep the blend's weights with the plan (swaps to it then only repoint)."""
        if plan.weights is not None:
            return
        with one_thread():
            plan.weights = {key: add_update(self._pristine[key], u) for key, u in plan.updates.items()}

    @torch.no_grad()
    def apply(self, plan: BlendPlan | None) -> int:
        """Make the weights ``plan``'s (``None``: the base alone); returns the modules changed."""
        with one_thread():
            return self._apply(plan)

    def _apply(self, plan: BlendPlan | None) -> int:
        new = plan.updates if plan is not None else {}
        touched = 0
        for key in [k for k in self._current if k not in new]:
            self._params[key].data = self._pristine[key]
            del self._current[key]
            touched += 1
        for key, update in new.items():
            if plan is not None and plan.weights is not None:
                target = plan.weights[key]
                if self._current.get(key) is target:
                    continue
            else:
                scratch = self._scratch.get(key)
                if scratch is None:
                    scratch = self._scratch[key] = torch.empty_like(
                        self._pristine[key], memory_format=torch.contiguous_format
                    )
                target = add_update(self._pristine[key], update, scratch)
            self._params[key].data = target
            self._current[key] = target
            touched += 1
        self.signature = plan.signature if plan is not None else ()
        return touched


def _stacked(ordered: Sequence[tuple[PreparedAdapter, float]]) -> dict[str, Update]:
    per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for prepared, weight in ordered:
        for key, (down, up) in prepared.factors.items():
            per_module.setdefault(key, []).append((down, up, float(weight)))
    return {key: stack_low_rank(parts) for key, parts in per_module.items()}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
