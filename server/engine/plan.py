"""What the engine hands a backend: a blend's plan, and the protocol a backend implements.

The engine owns this contract; ``server.backends`` implements it and the
composition root (``server.bootstrap``) gives the engine a built backend, so
nothing under ``server.engine`` imports ``server.backends``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from adapters.blend import Update

Signature = tuple[tuple[str, float], ...]

BIAS_SUFFIX = ".bias"


def bias_key(key: str) -> str:
    """The plan key of a module's bias (its weight's key is the module key itself)."""
    return key + BIAS_SUFFIX


@dataclass
class BlendPlan:
    """One blend, ready to write: per module its ``Update`` (a stacked low-rank pair, a dense
    delta or a DoRA rescale; a bias difference under ``bias_key(key)``), and optionally the
    blend's materialized weights (then a swap only repoints)."""

    signature: Signature
    updates: Mapping[str, Update]
    update_bytes: int
    weights: dict[str, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        held = sum(t.numel() * t.element_size() for t in self.weights.values()) if self.weights else 0
        return self.update_bytes + held

    def only(self, keys) -> BlendPlan:
        """This plan restricted to ``keys`` (a backend's share, or torch's)."""
        updates = {key: update for key, update in self.updates.items() if key in keys}
        if len(updates) == len(self.updates):
            return self
        weights = None if self.weights is None else {key: self.weights[key] for key in updates}
        return BlendPlan(self.signature, updates, 0, weights)


class EngineBackend(Protocol):
    """What runs the denoising loop's components, hot-swapped by ``apply``.

    ``name``/``precision``/``label`` describe it; ``owns(key)`` says which adapter keys
    it writes itself (the engine's fused path writes the rest into the torch modules); a
    module's bias key (``bias_key``) is owned only by a backend that writes biases;
    ``view(pipeline)`` is the pipeline to run (with the backend's components in place).
    """

    name: str
    precision: str

    @property
    def label(self) -> str: ...

    def owns(self, key: str) -> bool: ...

    def apply(self, plan: BlendPlan | None) -> int: ...

    def view(self, pipeline: Any) -> Any: ...


@dataclass(frozen=True)
class TorchBackend:
    """The reference: the pipeline's own torch modules run everything (the engine writes them)."""

    name: str = "torch"
    precision: str = "fp32"

    @property
    def label(self) -> str:
        return self.name

    def owns(self, key: str) -> bool:
        return False

    def apply(self, plan: BlendPlan | None) -> int:
        return 0

    def view(self, pipeline: Any) -> Any:
        return pipeline


@contextmanager
def one_thread() -> Iterator[None]:
    """Run a swap's many small kernels on one CPU thread.

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
