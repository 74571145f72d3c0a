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


class Materialized:
    """Stands in a plan for a module's update once the plan holds the module's weights
    (``BlendPlan.weights``): the factors are let go, the weights say it all."""

    nbytes = 0

    def __repr__(self) -> str:
        return "MATERIALIZED"


MATERIALIZED = Materialized()


@dataclass
class BlendPlan:
    """One blend, ready to write: per module its ``Update`` (a stacked low-rank pair, a dense
    delta or a DoRA rescale; a bias difference under ``bias_key(key)``), and optionally the
    blend's materialized weights (then a swap only repoints, and the updates of the modules
    they cover are ``MATERIALIZED``: ``release_materialized``)."""

    signature: Signature
    updates: Mapping[str, Update | Materialized]
    update_bytes: int
    weights: dict[str, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        held = sum(t.numel() * t.element_size() for t in self.weights.values()) if self.weights else 0
        return self.update_bytes + held

    def release_materialized(self) -> int:
        """Let go of the updates whose result ``weights`` holds (at SDXL size a 2-adapter blend's
        stacked factors are 0.9 GB beside its 5.8 GB of weights); returns the bytes released."""
        if not self.weights:
            return 0
        released = sum(self.updates[key].nbytes for key in self.weights)
        self.updates = {
            key: MATERIALIZED if key in self.weights else update for key, update in self.updates.items()
        }
        self.update_bytes -= released
        return released

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
    """Run many small kernels on one CPU thread (see ``threads_for``)."""
    with KernelThreads() as threads:
        threads.fit(0)
        yield


# A kernel of fewer multiply-adds than this runs on one thread: ~0.1-0.2 ms of one core, about
# what waking a thread pool can cost on a busy CPU (measured: 3 us vs 40 us-4 ms per small addmm).
PARALLEL_WORK = 1 << 22


def threads_for(work: int, available: int, parallel_work: int = PARALLEL_WORK) -> int:
    """The CPU threads for one kernel of ``work`` multiply-adds: one below ``PARALLEL_WORK`` (a
    pool costs more than it saves), else one per ``PARALLEL_WORK`` of work, up to ``available``
    (the caller's torch thread count). SD 1.5's 1280x1280 weights under a rank-64 blend (1.1e8)
    get them all, its 320x320 ones (6.7e6) one. Measured on the 2-core development machine: 60
    such 1280x1280 writes took 159 ms on one thread, 92 ms on two when both cores were free (but
    5x longer on two while another process held a core: a pool waits for its slowest thread)."""
    if available <= 1 or work < parallel_work:
        return 1
    return max(1, min(available, work // max(1, parallel_work)))


def update_work(rows: int, columns: int, update: Update | None) -> int:
    """Multiply-adds (or element operations) of writing ``W0 + update`` for a ``rows x columns``
    weight; ``None``: a copy (``W0`` itself)."""
    from adapters.blend import Dense, LowRank, Rescaled

    size = rows * columns
    if isinstance(update, Rescaled):
        return update_work(rows, columns, update.inner) + size
    if isinstance(update, LowRank):
        return size * (int(update.down.shape[0]) + 1)
    if isinstance(update, Dense):
        return 2 * size
    return size


class KernelThreads:
    """Sets torch's CPU thread count per kernel by its work (``threads_for``) and gives the caller's
    count back on exit. Switching the pool size costs well under 1 us; callers order their kernels
    by ``threads_for`` so that it changes once or twice per swap. Not for concurrent use from
    several threads (torch's count is process-wide): the engine calls it under its lock.
    ``parallel_work``: the threshold of ``threads_for`` (tests lower it to run every kernel on
    the pool)."""

    def __init__(self, parallel_work: int = PARALLEL_WORK) -> None:
        self.parallel_work = parallel_work
        self.available = 1
        self._current = 1

    def __enter__(self) -> KernelThreads:
        self.available = self._current = torch.get_num_threads()
        return self

    def threads(self, work: int) -> int:
        return threads_for(work, self.available, self.parallel_work)

    def fit(self, work: int) -> None:
        """Run the next kernels with the threads ``work`` calls for."""
        wanted = self.threads(work)
        if wanted != self._current:
            torch.set_num_threads(wanted)
            self._current = wanted

    def __exit__(self, *_exc) -> None:
        if self._current != self.available:
            torch.set_num_threads(self.available)
            self._current = self.available
