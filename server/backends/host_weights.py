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
    not copied; float32, or a weight in ``dtype`` when that is bf16)."""

    def __init__(self, pristine: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
        self.pristine = dict(pristine)
        self.dtype = dtype
        self._buffers = {key: w.to(buffer_dtype(key, dtype), copy=True) for key, w in self.pristine.items()}
        # Per key, as matrices: (W0, the buffer, float32 scratch for bf16 buffers); a swap
        # then costs one or two kernels per module and no view arithmetic.
        bf16 = {key for key, buffer in self._buffers.items() if buffer.dtype == torch.bfloat16}
        largest = max((self.pristine[key].numel() for key in bf16), default=0)
        scratch = torch.empty(largest, dtype=torch.float32)
        self._matrices = {
            key: (
                w.view(w.shape[0], -1),
                self._buffers[key].view(w.shape[0], -1),
                scratch[: w.numel()].view(w.shape[0], -1) if key in bf16 else None,
            )
            for key, w in self.pristine.items()
        }
        self.touched: frozenset[str] = frozenset()
        self.signature: tuple[tuple[str, float], ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self._buffers)

    def buffer(self, key: str) -> torch.Tensor:
        """The buffer of ``key`` (what the runtime reads on the next call)."""
        return self._buffers[key]

    @property
    def nbytes(self) -> int:
        """The bytes of the buffers (not the shared ``pristine`` tensors, nor the scratch)."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())

    @property
    def scratch_bytes(self) -> int:
        """The bytes of the float32 scratch a bf16 blend is computed in (the largest bf16 weight)."""
        return max(
            (s.numel() * s.element_size() for _, _, s in self._matrices.values() if s is not None), default=0
        )

    @property
    def pristine_bytes(self) -> int:
        """The bytes of the ``pristine`` tensors (shared or not)."""
        return sum(w.numel() * w.element_size() for w in self.pristine.values())

    @torch.no_grad()
    def apply(self, plan: BlendPlan | None) -> int:
        """Write ``plan``'s weights for these keys (``None``: base) in place; returns modules written.
        Each kernel runs on the threads its work calls for (one for small ones)."""
        with KernelThreads() as threads:
            return self._apply(plan, threads)

    def _apply(self, plan: BlendPlan | None, threads: KernelThreads) -> int:
        updates = {k: v for k, v in (plan.updates.items() if plan is not None else ()) if k in self._buffers}
        written = 0
        threads.fit(0)
        for key in self.touched - updates.keys():
            self._buffers[key].copy_(self.pristine[key])  # bf16: the same rounding as at start
            written += 1

        def work(key: str) -> int:
            base = self._matrices[key][0]
            return update_work(base.shape[0], base.shape[1], updates[key])

        for key in sorted(updates, key=lambda key: threads.threads(work(key))):
            base, out, scratch = self._matrices[key]
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
        return written
