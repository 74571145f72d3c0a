"""Adapter-targetable weights as host buffers a runtime reads in place, and the blend written into them.

A runtime (OpenVINO, ONNX Runtime) binds each buffer's memory once as a graph
input. A swap writes ``W0 + B @ A`` (from the pristine base, never from the
previous blend) into the buffers of the modules the blend touches and restores
those the previous blend touched; nothing is rebound. With bf16 buffers the
blend is computed in float32 and rounded once, and a restore copies ``W0`` as at
the start, so the base comes back bit for bit. ``W0`` itself may be kept in bf16
(``SharedWeights`` does, for bf16 buffers: half the bytes of float32): what a
bf16 runtime reads of the base is then exactly ``W0``, and a blend is
``bf16(float32(W0) + update)``. Bias buffers (keys
``<key>.bias``, for full-weight diffs that change a bias) stay float32 whatever
``dtype`` the weights have: a runtime reads them as it read its constant biases.

Lazy keys (``lazy``, copy on write): keys whose buffer is ``W0`` itself until a
blend touches them. A blend that does allocates a buffer for each key it touches
and writes it; a blend that no longer does drops that buffer, and the key reads
``W0`` again (the base, bit for bit, with no copy). For what a usual blend leaves
at its base (OpenVINO's spatial convolutions and biases: more than half the
UNet's weights), a set of buffers then holds only what its blend changed.
``changed`` tells a runtime which keys' memory moved, to rebind them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adapters.blend import add_update
from server.engine.plan import BIAS_SUFFIX, BlendPlan, KernelThreads, update_work


def is_bias_key(key: str) -> bool:
    return key.endswith(BIAS_SUFFIX)


def buffer_dtype(key: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``key``'s buffer in a set of ``dtype`` weights (a bias stays float32)."""
    return torch.float32 if is_bias_key(key) else dtype


def buffer_bytes(pristine: Mapping[str, torch.Tensor], dtype: torch.dtype) -> int:
    """The bytes ``HostWeights(pristine, dtype)`` allocates for its buffers (before allocating them)."""
    return sum(w.numel() * buffer_dtype(key, dtype).itemsize for key, w in pristine.items())


class HostWeights:
    """Buffers (``dtype``; biases float32) over the ``pristine`` tensors (canonical key -> tensor,
    not copied; float32, or a weight in ``dtype`` when that is bf16); ``lazy`` keys' buffers are
    their ``W0`` until a blend touches them (the module's doc)."""

    def __init__(
        self,
        pristine: Mapping[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        lazy: frozenset[str] = frozenset(),
    ) -> None:
        self.pristine = dict(pristine)
        self.dtype = dtype
        # A lazy key reads W0 in place only where W0 has the buffer's dtype (else it is copied).
        self.lazy = frozenset(
            key for key in lazy if key in self.pristine and pristine[key].dtype == buffer_dtype(key, dtype)
        )
        self._buffers = {
            key: w if key in self.lazy else w.to(buffer_dtype(key, dtype), copy=True)
            for key, w in self.pristine.items()
        }
        self._bf16 = {key for key in self._buffers if buffer_dtype(key, dtype) == torch.bfloat16}
        # float32 scratch for a bf16 blend, as large as the largest eager bf16 weight (grown when a
        # larger lazy one is written).
        eager = [self.pristine[key].numel() for key in self._bf16 - self.lazy]
        self._scratch = torch.empty(max(eager, default=0), dtype=torch.float32)
        self.touched: frozenset[str] = frozenset()
        self.signature: tuple[tuple[str, float], ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self._buffers)

    def buffer(self, key: str) -> torch.Tensor:
        """The buffer of ``key`` (what the runtime reads on the next call; a lazy key's ``W0`` while
        no blend touches it)."""
        return self._buffers[key]

    def own(self, key: str) -> bool:
        """Whether ``key``'s buffer is this set's own memory (not a lazy key reading ``W0``)."""
        return self._buffers[key] is not self.pristine[key]

    @property
    def nbytes(self) -> int:
        """The bytes of the buffers allocated (not the shared ``pristine`` tensors, nor the scratch)."""
        return sum(b.numel() * b.element_size() for key, b in self._buffers.items() if self.own(key))

    @property
    def lazy_bytes(self) -> int:
        """The bytes of the lazy keys' buffers allocated (part of ``nbytes``)."""
        return sum(
            self._buffers[key].numel() * self._buffers[key].element_size()
            for key in self.lazy
            if self.own(key)
        )

    @property
    def scratch_bytes(self) -> int:
        """The bytes of the float32 scratch a bf16 blend is computed in (the largest bf16 weight
        written or eager)."""
        return self._scratch.numel() * self._scratch.element_size()

    @property
    def pristine_bytes(self) -> int:
        """The bytes of the ``pristine`` tensors (shared or not)."""
        return sum(w.numel() * w.element_size() for w in self.pristine.values())

    def changed(self, keys: frozenset[str]) -> None:
        """Called after a swap with the keys whose buffer was allocated or dropped (lazy keys):
        a runtime that bound their memory rebinds them. Nothing here."""

    @torch.no_grad()
    def apply(self, plan: BlendPlan | None) -> int:
        """Write ``plan``'s weights for these keys (``None``: base) in place; returns modules written.
        Each kernel runs on the threads its work calls for (one for small ones)."""
        with KernelThreads() as threads:
            return self._apply(plan, threads)

    def _matrices(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``key``'s (W0, buffer, float32 scratch for a bf16 buffer), as matrices."""
        w = self.pristine[key]
        rows = w.shape[0]
        scratch = None
        if key in self._bf16:
            if self._scratch.numel() < w.numel():
                self._scratch = torch.empty(w.numel(), dtype=torch.float32)
            scratch = self._scratch[: w.numel()].view(rows, -1)
        return w.view(rows, -1), self._buffers[key].view(rows, -1), scratch

    def _apply(self, plan: BlendPlan | None, threads: KernelThreads) -> int:
        updates = {k: v for k, v in (plan.updates.items() if plan is not None else ()) if k in self._buffers}
        written = 0
        moved: set[str] = set()
        threads.fit(0)
        for key in self.touched - updates.keys():
            if key in self.lazy:  # W0 read in place again: the base, bit for bit
                self._buffers[key] = self.pristine[key]
                moved.add(key)
            else:
                self._buffers[key].copy_(self.pristine[key])  # bf16: the same rounding as at start
            written += 1
        for key in updates.keys() & self.lazy:
            if not self.own(key):
                self._buffers[key] = torch.empty_like(self.pristine[key])
                moved.add(key)

        def work(key: str) -> int:
            base = self.pristine[key]
            return update_work(base.shape[0], base.numel() // max(base.shape[0], 1), updates[key])

        for key in sorted(updates, key=lambda key: threads.threads(work(key))):
            base, out, scratch = self._matrices(key)
            threads.fit(work(key))
            if scratch is None:
                add_update(base, updates[key], out)
            elif base.dtype == scratch.dtype:  # W0 + update in float32, rounded once into the buffer
                out.copy_(add_update(base, updates[key], scratch))
            else:  # a bf16 W0: widened into the scratch, the update added there in place
                scratch.copy_(base)
                out.copy_(add_update(scratch, updates[key], scratch))
            written += 1
        self.touched = frozenset(updates)
        self.signature = plan.signature if plan is not None else ()
        if moved:
            self.changed(frozenset(moved))
        return written
