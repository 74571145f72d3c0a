"""Fused hot-swap: a blend's weights are computed from pristine weights, never from the previous blend.

For every module a blend touches, ``W = W0 + update`` where the update is the
blend's stacked low-rank pair (``sum_i w_i * scale_i * B_i @ A_i`` as one
``addmm``), a dense delta (LoHa, LoKr and full diffs, whose update each adapter
computes once when it is prepared; TIES/DARE merges), or DoRA's rescale of the
blended weight (``adapters.blend.combine`` holds the forms and the arithmetic).
A layer's bias is a target too (key ``<module key>.bias``) when an adapter
carries a bias difference. ``W0`` is the base model's own weight tensor, which
is never written to again. A blend's weights are either
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

from adapters.blend import (
    LINEAR,
    Blend,
    Dense,
    Merge,
    PreparedModule,
    Update,
    Weight,
    add_update,
    combine,
    combine_bias,
    merged_update,
    parts_of,
    prepare_module,
    weight_for,
)
from adapters.canonical import LoraAdapter
from adapters.errors import AdapterIncompatible
from server.engine.plan import BlendPlan, bias_key, one_thread


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter in the engine's layout, one ``PreparedModule`` per module key: a low-rank pair
    ``(A (r, in*k*k), B*scale (out, r))``, or the dense update of a LoHa, LoKr or diff (as many
    bytes as the weight), with DoRA's magnitude and a bias difference when it has them.
    ``nbytes`` counts all of it (the adapter cache is bounded by it)."""

    name: str
    version: int
    sha256: str
    modules: Mapping[str, PreparedModule]
    nbytes: int


class FusedWeights:
    """Owns the target weights of a pipeline and the blend currently written into them."""

    def __init__(self, targets: Mapping[str, nn.Module]) -> None:
        self._params: dict[str, nn.Parameter] = {key: module.weight for key, module in targets.items()}
        for key, module in targets.items():  # biases: written only by adapters with bias differences
            if getattr(module, "bias", None) is not None:
                self._params[bias_key(key)] = module.bias
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
        """Check ``adapter`` against the weights and lay each module out for blending: a low-rank
        pair for ``addmm``, or (LoHa, LoKr, diff) its dense update, computed here once."""
        unknown = sorted(key for key in adapter.modules if key not in self._pristine)
        if unknown:
            shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            raise AdapterIncompatible(
                f"adapter {name}@{version} targets modules the base model does not have ({shown}); "
                "it was made for another base model"
            )
        modules: dict[str, PreparedModule] = {}
        for key in sorted(adapter.modules):
            module = adapter.modules[key]
            weight = self._pristine[key]
            if not module.fits(tuple(weight.shape)):
                raise AdapterIncompatible(
                    f"adapter {name}@{version} module {key} updates a weight of shape "
                    f"{module.weight_shape}, the base model's is {tuple(weight.shape)}; "
                    "it was made for another base model"
                )
            if module.bias is not None and bias_key(key) not in self._pristine:
                raise AdapterIncompatible(
                    f"adapter {name}@{version} changes the bias of {key}, a layer without a bias in "
                    "this base model; it was made for another base model"
                )
            # Half-precision weights: factors stay float32, the blend is cast once in add_update.
            dtype = torch.float32 if weight.element_size() < 4 else weight.dtype
            modules[key] = prepare_module(module, tuple(weight.shape), device=weight.device, dtype=dtype)
        nbytes = sum(prepared.nbytes for prepared in modules.values())
        return PreparedAdapter(name=name, version=version, sha256=sha256, modules=modules, nbytes=nbytes)

    def plan(self, entries: Sequence[tuple[PreparedAdapter, Weight]], merge: Merge = LINEAR) -> BlendPlan:
        """The per-module updates of ``entries`` (in signature order) combined by ``merge``.

        A weight may be ``PartWeights`` (one for the text encoders, one for the UNet); a module
        whose members all have weight 0 is not touched (it stays the base's, bit for bit).
        """
        blend = Blend.of(((prepared.sha256, weight) for prepared, weight in entries), merge)
        ordered = sorted(entries, key=lambda item: (item[0].sha256, parts_of(item[1])))
        with one_thread():
            updates = self._linear(ordered) if blend.merge.is_linear else self._merged(ordered, blend.merge)
        return BlendPlan(blend.signature, updates, sum(u.nbytes for u in updates.values()))

    def _linear(self, ordered: Sequence[tuple[PreparedAdapter, Weight]]) -> dict[str, Update]:
        updates: dict[str, Update] = {}
        for key in sorted({key for prepared, _ in ordered for key in prepared.modules}):
            members = [
                (prepared.modules[key], weight_for(weight, key))
                for prepared, weight in ordered
                if key in prepared.modules and weight_for(weight, key) != 0.0
            ]
            if not members:
                continue
            dora = any(member.dora is not None for member, _ in members)
            updates[key] = combine(members, self._pristine[key] if dora else None)
            bias = combine_bias(members)
            if bias is not None:
                updates[bias_key(key)] = Dense(bias)
        return updates

    def _merged(self, ordered: Sequence[tuple[PreparedAdapter, Weight]], merge: Merge) -> dict[str, Update]:
        """Merged deltas (dense), modules in sorted order (DARE's random stream follows it). An adapter
        with weight 0 on a module (a part weighted 0) takes no part in its merge; biases add linearly."""
        generator = torch.Generator().manual_seed(merge.seed)
        updates: dict[str, Update] = {}
        for key in sorted({key for prepared, _ in ordered for key in prepared.modules}):
            members = [
                (
                    prepared.modules.get(key) if weight_for(weight, key) != 0.0 else None,
                    weight_for(weight, key),
                )
                for prepared, weight in ordered
            ]
            if all(member is None for member, _ in members):
                continue
            updates[key] = merged_update(members, merge, self._pristine[key], generator)
            bias = combine_bias([(member, weight) for member, weight in members if member is not None])
            if bias is not None:
                updates[bias_key(key)] = Dense(bias)
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


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
