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

A blend's weights (materialized or scratch) live in one allocation per dtype and device
(a slab; each weight a 64-byte aligned view, as torch aligns its own tensors): at SD 1.5
size, 264 separate allocations took 4x longer to fault in than one, and faulting in fresh
memory costs more than computing the blend (1.4 GB: 0.5-4 s against 0.6 s here). So a
dropped blend's slab (``recycle``: an evicted plan's, the warm-up's) is kept as a spare and
the next slab of about its size is carved from it. Each kernel runs on the threads its
work calls for (``server.engine.plan.threads_for``): one for the many small updates of a
tiny model, torch's threads for a 1280x1280 one. A scratch buffer still holding the
update a swap asks for is repointed, not rewritten.

Not thread-safe on its own: the engine calls it under its lock.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
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
from server.engine.plan import PARALLEL_WORK, BlendPlan, KernelThreads, Materialized, bias_key, update_work

ALIGN_BYTES = 64  # where each weight of a slab starts (torch's CPU allocator aligns to 64 too)


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
    """Owns the target weights of a pipeline and the blend currently written into them.

    ``parallel_work``: the work from which a kernel runs on torch's threads (``threads_for``).
    ``w0_on_host``: keep ``W0`` in host memory (pinned on a GPU, as A1111 and ComfyUI keep
    their backups) and write every blend into the parameters' own tensors, in place: the
    device then holds one copy of each weight instead of ``W0`` plus the blend's (SDXL in
    fp16: 5.8 GB less VRAM), and a swap copies ``W0`` from the host before adding the
    update. No blend is materialized then (``keeps_blends`` is false)."""

    def __init__(
        self,
        targets: Mapping[str, nn.Module],
        *,
        parallel_work: int = PARALLEL_WORK,
        w0_on_host: bool = False,
    ) -> None:
        self.parallel_work = parallel_work
        self.w0_on_host = w0_on_host
        self._params: dict[str, nn.Parameter] = {key: module.weight for key, module in targets.items()}
        for key, module in targets.items():  # biases: written only by adapters with bias differences
            if getattr(module, "bias", None) is not None:
                self._params[bias_key(key)] = module.bias
        # The tensors the parameters run with at the base: their device, dtype and shape.
        self._like: dict[str, torch.Tensor] = {key: p.data for key, p in self._params.items()}
        # The pristine W0: the base's own tensors, never written to (or their host copies).
        self._pristine: dict[str, torch.Tensor] = (
            {key: _host_copy(t) for key, t in self._like.items()} if w0_on_host else dict(self._like)
        )
        self._scratch: dict[str, torch.Tensor] = {}
        # key -> the update its scratch buffer holds (W0 + it), while that update is alive.
        self._scratch_holds: dict[str, weakref.ref] = {}
        # Slabs no blend uses any more (an evicted plan's, the warm-up's), their pages already
        # faulted in: the next slab of about their size is carved from one instead of allocated.
        self._spares: list[torch.Tensor] = []
        # key -> the tensor the parameter points at now, for modules not at W0.
        self._current: dict[str, torch.Tensor] = {}
        self.signature: tuple[tuple[str, float], ...] = ()
        self.written = 0  # modules the last ``apply`` computed (the others it only repointed)

    @property
    def scratch_bytes(self) -> int:
        """Bytes of the per-module buffers used for blends that are not materialized."""
        return sum(_nbytes(t) for t in self._scratch.values())

    @property
    def keeps_blends(self) -> bool:
        """Whether a blend's weights may be materialized (not with ``w0_on_host``)."""
        return not self.w0_on_host

    @property
    def host_bytes(self) -> int:
        """Bytes of the host copy of ``W0`` (``w0_on_host``), else 0."""
        return sum(_nbytes(t) for t in self._pristine.values()) if self.w0_on_host else 0

    def reusable_bytes(self, nbytes: int) -> int:
        """Of ``nbytes`` of new blend weights, what a spare slab (its pages already faulted in)
        would give: all of it when one fits within ``SPARE_SLACK``, else nothing."""
        fits = any(nbytes <= _nbytes(spare) <= nbytes * SPARE_SLACK for spare in self._spares)
        return nbytes if fits else 0

    def materialized_bytes(self, plan: BlendPlan) -> int:
        """What materializing ``plan`` would hold: one copy of every weight it touches."""
        return sum(_nbytes(self._like[key]) for key in plan.updates)

    def _base(self, key: str) -> torch.Tensor:
        """``W0`` of ``key`` where its parameter lives (from the host copy: a staged copy)."""
        pristine = self._pristine[key]
        like = self._like[key]
        return pristine if pristine.device == like.device else pristine.to(like.device, non_blocking=True)

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
            weight = self._like[key]
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
        with KernelThreads(self.parallel_work) as threads:
            updates = (
                self._linear(ordered, threads)
                if blend.merge.is_linear
                else self._merged(ordered, blend.merge, threads)
            )
        return BlendPlan(blend.signature, updates, sum(u.nbytes for u in updates.values()))

    def _linear(
        self, ordered: Sequence[tuple[PreparedAdapter, Weight]], threads: KernelThreads
    ) -> dict[str, Update]:
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
            # Stacking low-rank pairs is small work; dense members and DoRA's norms are not.
            dense = sum(member.dense is not None for member, _ in members) + (2 if dora else 0)
            threads.fit(dense * self._like[key].numel())
            updates[key] = combine(members, self._base(key) if dora else None)
            bias = combine_bias(members)
            if bias is not None:
                updates[bias_key(key)] = Dense(bias)
        return updates

    def _merged(
        self, ordered: Sequence[tuple[PreparedAdapter, Weight]], merge: Merge, threads: KernelThreads
    ) -> dict[str, Update]:
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
            threads.fit(8 * len(members) * self._like[key].numel())  # task tensors, prune, merge
            updates[key] = merged_update(members, merge, self._base(key), generator)
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
        if not self.keeps_blends:
            raise RuntimeError("blends are written in place (w0_on_host): none is materialized")
        weights = self._slab_views((key, self._pristine[key]) for key in plan.updates)
        with KernelThreads(self.parallel_work) as threads:
            for key in self._by_threads(plan.updates, threads):
                threads.fit(self._work(key, plan.updates[key]))
                add_update(self._pristine[key], plan.updates[key], weights[key])
        plan.weights = weights

    @torch.no_grad()
    def apply(self, plan: BlendPlan | None) -> int:
        """Make the weights ``plan``'s (``None``: the base alone); returns the modules changed."""
        if self.w0_on_host:
            return self._apply_in_place(plan)
        new = plan.updates if plan is not None else {}
        touched = 0
        for key in [k for k in self._current if k not in new]:
            self._params[key].data = self._pristine[key]
            del self._current[key]
            touched += 1
        writes: list[str] = []
        for key, update in new.items():
            if plan is not None and plan.weights is not None:
                target = plan.weights[key]
                if self._current.get(key) is target:
                    continue
                self._repoint(key, target)
            else:
                held = self._scratch_holds.get(key)
                if held is not None and held() is update and key in self._scratch:
                    if self._current.get(key) is self._scratch[key]:
                        continue
                    self._repoint(key, self._scratch[key])  # the buffer holds W0 + update already
                else:
                    writes.append(key)
            touched += 1
        self.written = len(writes)
        if any(isinstance(new[key], Materialized) for key in writes):
            raise RuntimeError("this plan's weights were recycled and its factors let go: build it again")
        if writes:
            missing = [key for key in writes if key not in self._scratch]
            if missing:
                self._scratch.update(self._slab_views((key, self._pristine[key]) for key in missing))
            with KernelThreads(self.parallel_work) as threads:
                for key in self._by_threads({key: new[key] for key in writes}, threads):
                    self._scratch_holds.pop(key, None)
                    threads.fit(self._work(key, new[key]))
                    add_update(self._pristine[key], new[key], self._scratch[key])
                    self._scratch_holds[key] = weakref.ref(new[key])
                    self._repoint(key, self._scratch[key])
        self.signature = plan.signature if plan is not None else ()
        return touched

    def _apply_in_place(self, plan: BlendPlan | None) -> int:
        """``apply`` with ``w0_on_host``: each parameter's own tensor is written, from ``W0``
        copied from the host; a tensor still holding the update asked for is left as it is."""
        new = plan.updates if plan is not None else {}
        touched = 0
        for key in [k for k in self._current if k not in new]:
            self._like[key].copy_(self._pristine[key], non_blocking=True)
            del self._current[key]
            self._scratch_holds.pop(key, None)
            touched += 1
        writes = []
        for key, update in new.items():
            held = self._scratch_holds.get(key)
            if held is None or held() is not update:
                writes.append(key)
            touched += 1
        if any(isinstance(new[key], Materialized) for key in writes):
            raise RuntimeError("this plan's factors were let go: build it again")
        self.written = len(writes)
        with KernelThreads(self.parallel_work) as threads:
            for key in self._by_threads({key: new[key] for key in writes}, threads):
                self._scratch_holds.pop(key, None)
                threads.fit(self._work(key, new[key]))
                add_update(self._base(key), new[key], self._like[key])
                self._scratch_holds[key] = weakref.ref(new[key])
                self._current[key] = self._like[key]
        self.signature = plan.signature if plan is not None else ()
        return touched

    def recycle(self, plan: BlendPlan) -> None:
        """``plan`` is dropped: keep the slab of its weights for the next one (unless a parameter
        still points into it). The spare is used or freed by the next slab allocated."""
        if plan.weights is None:
            return
        slabs = {id(root): root for root in (_root(view) for view in plan.weights.values())}
        in_use = {id(_root(tensor)) for tensor in self._current.values()}
        self._spares.extend(slab for key, slab in slabs.items() if key not in in_use)
        plan.weights = None

    def _slab_views(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        spares, self._spares = self._spares, []
        return _slab_views(pairs, spares)

    def _repoint(self, key: str, target: torch.Tensor) -> None:
        self._params[key].data = target
        self._current[key] = target

    def _work(self, key: str, update: Update) -> int:
        weight = self._like[key]
        rows = int(weight.shape[0]) if weight.dim() else 1
        return update_work(rows, weight.numel() // max(rows, 1), update)

    def _by_threads(self, updates: Mapping[str, Update], threads: KernelThreads) -> list[str]:
        """The keys of ``updates``, those one thread computes first (the pool size changes once)."""
        return sorted(updates, key=lambda key: threads.threads(self._work(key, updates[key])))


SPARE_SLACK = 1.25  # a spare slab serves a slab of at least 1/SPARE_SLACK of its size


def _slab_views(
    pairs: Iterable[tuple[str, torch.Tensor]], spares: Sequence[torch.Tensor] = ()
) -> dict[str, torch.Tensor]:
    """A fresh contiguous tensor like each ``(key, tensor)``'s, all carved from one slab per dtype
    and device, each starting on an ``ALIGN_BYTES`` boundary. A slab is the smallest of ``spares``
    that fits (within ``SPARE_SLACK``), else a new allocation; the other spares are let go."""
    groups: dict[tuple[torch.dtype, torch.device], list[tuple[str, torch.Tensor]]] = {}
    for key, tensor in pairs:
        groups.setdefault((tensor.dtype, tensor.device), []).append((key, tensor))
    spares = sorted(spares, key=lambda slab: slab.numel())
    views: dict[str, torch.Tensor] = {}
    for (dtype, device), members in groups.items():
        step = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
        offsets, total = [], 0
        for _, tensor in members:
            offsets.append(total)
            total += -(-tensor.numel() // step) * step
        fits = [
            index
            for index, spare in enumerate(spares)
            if (spare.dtype, spare.device) == (dtype, device)
            and total <= spare.numel() <= total * SPARE_SLACK
        ]
        slab = spares.pop(fits[0]) if fits else torch.empty(total, dtype=dtype, device=device)
        for (key, tensor), offset in zip(members, offsets, strict=True):
            views[key] = slab[offset : offset + tensor.numel()].view(tensor.shape)
    return views


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of ``tensor``: pinned when it lives on a GPU (its copies back are asynchronous)."""
    copy = tensor.detach().to("cpu", copy=True)
    return copy.pin_memory() if tensor.is_cuda else copy


def _root(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor ``tensor`` is a view of (itself when it is none)."""
    return tensor if tensor._base is None else tensor._base


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
