"""Fused hot-swap: a blend's weights are computed from pristine weights, never from the previous blend.

For every module a blend touches, ``W = W0 + sum_i w_i * scale_i * B_i @ A_i`` is
computed as one ``addmm`` from a stacked factor pair (``B`` columns carry
``w_i * scale_i``, ``A`` rows are stacked). ``W0`` is the base model's own weight
tensor, which is never written to again. A blend's weights are either
*materialized* (computed once and kept with the blend's plan, in the engine's
byte-bounded plan cache: a swap then only repoints each parameter, a few
microseconds per module) or written into a per-module scratch buffer on every
swap. Returning to the base repoints parameters at the untouched ``W0``
tensors, so A -> B -> A leaks nothing and the base comes back bit for bit.

Not thread-safe on its own: the engine calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from adapters.canonical import LoraAdapter
from adapters.errors import AdapterIncompatible


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter's factors in the engine's layout: per module ``(A (r, in*k*k), B*scale (out, r))``."""

    name: str
    version: int
    sha256: str
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


@dataclass
class BlendPlan:
    """One blend, ready to apply: per module ``(A_stack, B_stack)``, and optionally its weights."""

    signature: tuple[tuple[str, float], ...]
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    factor_bytes: int
    weights: dict[str, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        held = sum(_nbytes(t) for t in self.weights.values()) if self.weights is not None else 0
        return self.factor_bytes + held


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
        return sum(_nbytes(self._pristine[key]) for key in plan.factors)

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
            # Half-precision weights: factors stay float32, the blend is cast once in _compute.
            dtype = torch.float32 if weight.element_size() < 4 else weight.dtype
            down = module.down.reshape(rank, -1).to(device=weight.device, dtype=dtype)
            up = module.up.reshape(module.up.shape[0], rank).to(device=weight.device, dtype=torch.float32)
            up = (up * module.scale).to(dtype).contiguous()
            factors[key] = (down.contiguous(), up)
            nbytes += _nbytes(down) + _nbytes(up)
        return PreparedAdapter(name=name, version=version, sha256=sha256, factors=factors, nbytes=nbytes)

    @staticmethod
    def plan(entries: Sequence[tuple[PreparedAdapter, float]]) -> BlendPlan:
        """Stack the factors of ``entries`` (in signature order) per module."""
        ordered = sorted(entries, key=lambda item: (item[0].sha256, item[1]))
        signature = tuple((prepared.sha256, float(weight)) for prepared, weight in ordered)
        with one_thread():
            return FusedWeights._stack(ordered, signature)

    @staticmethod
    def _stack(
        ordered: Sequence[tuple[PreparedAdapter, float]], signature: tuple[tuple[str, float], ...]
    ) -> BlendPlan:
        per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for prepared, weight in ordered:
            for key, (down, up) in prepared.factors.items():
                per_module.setdefault(key, []).append((down, up, float(weight)))
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        nbytes = 0
        for key, parts in per_module.items():
            down = torch.cat([d for d, _, _ in parts], dim=0)
            up = torch.cat([u * w for _, u, w in parts], dim=1)
            factors[key] = (down, up)
            nbytes += _nbytes(down) + _nbytes(up)
        return BlendPlan(signature=signature, factors=factors, factor_bytes=nbytes)

    # ---------------------------------------------------------------- apply

    @torch.no_grad()
    def materialize(self, plan: BlendPlan) -> None:
        """Compute and keep the blend's weights with the plan (swaps to it then only repoint)."""
        if plan.weights is not None:
            return
        with one_thread():
            plan.weights = {key: self._compute(key, pair, None) for key, pair in plan.factors.items()}

    @torch.no_grad()
    def apply(self, plan: BlendPlan | None) -> int:
        """Make the weights ``plan``'s (``None``: the base alone); returns the modules changed."""
        with one_thread():
            return self._apply(plan)

    def _apply(self, plan: BlendPlan | None) -> int:
        new = plan.factors if plan is not None else {}
        touched = 0
        for key in [k for k in self._current if k not in new]:
            self._params[key].data = self._pristine[key]
            del self._current[key]
            touched += 1
        for key, pair in new.items():
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
                target = self._compute(key, pair, scratch)
            self._params[key].data = target
            self._current[key] = target
            touched += 1
        self.signature = plan.signature if plan is not None else ()
        return touched

    def _compute(
        self, key: str, pair: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor | None
    ) -> torch.Tensor:
        """``W0 + B @ A`` for one module, into ``out`` (or a new tensor shaped like the weight)."""
        pristine = self._pristine[key]
        down, up = pair
        rows = pristine.shape[0]
        base = pristine if pristine.is_contiguous() else pristine.contiguous()
        if out is None:
            out = torch.empty_like(base, memory_format=torch.contiguous_format)
        if up.dtype != base.dtype:  # fp16/bf16 weights: W0 + B @ A in float32, rounded once
            out.view(rows, -1).copy_(torch.addmm(base.view(rows, -1).to(up.dtype), up, down))
        else:
            torch.addmm(base.view(rows, -1), up, down, out=out.view(rows, -1))
        return out


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the swap's many small kernels on one CPU thread.

    Each low-rank update is small; waking a thread pool per kernel costs more than
    it saves, and on a busy CPU a pool barrier can take milliseconds (measured:
    3 us vs 40 us-4 ms per addmm). Switching the pool size costs well under 1 us.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
