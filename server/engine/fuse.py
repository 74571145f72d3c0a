"""Fused hot-swap: a blend is written into the base weights in place, always from pristine copies.

For every module a blend touches, ``W = W0 + sum_i w_i * scale_i * B_i @ A_i`` is
computed as one ``addmm`` from a stacked factor pair (``B`` columns carry
``w_i * scale_i``, ``A`` rows are stacked), written straight into the weight's
storage. ``W0`` is a copy taken the first time a module is touched; a module the
new blend leaves alone is restored from it by ``copy_``. Nothing is ever
subtracted, so A -> B -> A leaks nothing and the base comes back bit for bit.

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


@dataclass(frozen=True)
class BlendPlan:
    """Stacked factors of one blend, ready to apply: per module ``(A_stack, B_stack)``."""

    signature: tuple[tuple[str, float], ...]
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


class FusedWeights:
    """Owns the target weights of a pipeline and the blend currently written into them."""

    def __init__(self, targets: Mapping[str, nn.Module]) -> None:
        self._weights: dict[str, torch.Tensor] = {key: module.weight for key, module in targets.items()}
        self._pristine: dict[str, torch.Tensor] = {}
        self._applied: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.signature: tuple[tuple[str, float], ...] = ()

    @property
    def pristine_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._pristine.values())

    # ---------------------------------------------------------------- prepare

    def prepare(self, adapter: LoraAdapter, *, name: str, version: int, sha256: str) -> PreparedAdapter:
        """Check ``adapter`` against the weights and lay its factors out for ``addmm``."""
        unknown = sorted(key for key in adapter.modules if key not in self._weights)
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
            weight = self._weights[key]
            if tuple(weight.shape) != module.weight_shape:
                raise AdapterIncompatible(
                    f"adapter {name}@{version} module {key} updates a weight of shape "
                    f"{module.weight_shape}, the base model's is {tuple(weight.shape)}; "
                    "it was made for another base model"
                )
            rank = module.rank
            down = module.down.reshape(rank, -1).to(device=weight.device, dtype=weight.dtype)
            up = module.up.reshape(module.up.shape[0], rank).to(device=weight.device, dtype=torch.float32)
            up = (up * module.scale).to(weight.dtype).contiguous()
            factors[key] = (down.contiguous(), up)
            nbytes += _nbytes(down) + _nbytes(up)
        return PreparedAdapter(name=name, version=version, sha256=sha256, factors=factors, nbytes=nbytes)

    @staticmethod
    def plan(entries: Sequence[tuple[PreparedAdapter, float]]) -> BlendPlan:
        """Stack the factors of ``entries`` (in signature order) per module."""
        ordered = sorted(entries, key=lambda item: (item[0].sha256, item[1]))
        signature = tuple((prepared.sha256, float(weight)) for prepared, weight in ordered)
        with _one_thread():
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
        return BlendPlan(signature=signature, factors=factors, nbytes=nbytes)

    # ---------------------------------------------------------------- apply

    @torch.no_grad()
    def apply(self, plan: BlendPlan | None) -> int:
        """Write ``plan`` (``None``: the base alone) into the weights; returns the modules touched."""
        with _one_thread():
            return self._apply(plan)

    def _apply(self, plan: BlendPlan | None) -> int:
        new = plan.factors if plan is not None else {}
        touched = 0
        for key in [k for k in self._applied if k not in new]:
            self._weights[key].copy_(self._pristine[key])
            del self._applied[key]
            touched += 1
        for key, pair in new.items():
            current = self._applied.get(key)
            if current is not None and current[0] is pair[0] and current[1] is pair[1]:
                continue
            self._write(key, pair)
            self._applied[key] = pair
            touched += 1
        self.signature = plan.signature if plan is not None else ()
        return touched

    def _write(self, key: str, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        weight = self._weights[key]
        pristine = self._pristine.get(key)
        if pristine is None:
            pristine = self._pristine[key] = weight.detach().clone(memory_format=torch.contiguous_format)
        down, up = pair
        rows = weight.shape[0]
        if weight.is_contiguous():
            torch.addmm(pristine.view(rows, -1), up, down, out=weight.view(rows, -1))
        else:  # e.g. channels_last convolutions: compute, then copy into the strided storage
            weight.copy_(torch.addmm(pristine.view(rows, -1), up, down).view(weight.shape))


@contextmanager
def _one_thread() -> Iterator[None]:
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
