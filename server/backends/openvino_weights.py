"""Adapter-targetable weights as host buffers an OpenVINO model reads as inputs, swapped in place.

Each target's buffer is wrapped once in an ``ov.Tensor`` sharing its memory;
a model sets those tensors on its infer requests once. A swap writes
``W0 + B @ A`` (from the pristine base, never from the previous blend) into the
buffers of the modules the blend touches and restores those the previous blend
touched; nothing is rebound. With bf16 buffers the blend is computed in float32
and rounded once, and a restore rounds ``W0`` the same way as at the start, so
the base comes back bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from server.backends.openvino_runtime import openvino
from server.engine.fuse import BlendPlan, one_thread


class SharedWeights:
    """The buffers of ``targets`` (canonical key -> module) in ``dtype``, and the blend written in them."""

    def __init__(
        self,
        targets: Mapping[str, nn.Module],
        dtype: torch.dtype,
        pristine: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """``pristine``: another set's ``W0`` to share (more blend slots over the same base)."""
        ov = openvino()
        # W0: the base's own float32 tensors, shared, not copied. Nothing writes into them in place
        # (the engine's fused path repoints parameters, and leaves a backend's modules alone).
        if pristine is None:
            pristine = {key: m.weight.detach().to(torch.float32).contiguous() for key, m in targets.items()}
        self.pristine = dict(pristine)
        self.dtype = dtype
        self._buffers = {key: w.to(dtype, copy=True) for key, w in self.pristine.items()}
        ov_type = ov.Type.bf16 if dtype == torch.bfloat16 else ov.Type.f32
        self.tensors = {key: _shared_tensor(ov, buffer, ov_type) for key, buffer in self._buffers.items()}
        # Per key, as matrices: (W0, the buffer, float32 scratch for bf16 buffers); a swap
        # then costs one or two kernels per module and no view arithmetic.
        bf16 = dtype == torch.bfloat16
        largest = max((w.numel() for w in self.pristine.values()), default=0)
        scratch = torch.empty(largest if bf16 else 0, dtype=torch.float32)
        self._matrices = {
            key: (
                w.view(w.shape[0], -1),
                self._buffers[key].view(w.shape[0], -1),
                scratch[: w.numel()].view(w.shape[0], -1) if bf16 else None,
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

    def bind(self, request: Any, names: set[str]) -> None:
        """Set every tensor whose key is one of the request's input ``names`` (once per request)."""
        for key, tensor in self.tensors.items():
            if key in names:
                request.set_tensor(key, tensor)

    @torch.no_grad()
    def apply(self, plan: BlendPlan | None) -> int:
        """Write ``plan``'s weights for these keys (``None``: base) in place; returns modules written."""
        with one_thread():  # many small addmm: a thread pool costs more than it saves
            return self._apply(plan)

    def _apply(self, plan: BlendPlan | None) -> int:
        factors = {k: v for k, v in (plan.factors.items() if plan is not None else ()) if k in self._buffers}
        written = 0
        for key in self.touched - factors.keys():
            self._buffers[key].copy_(self.pristine[key])  # bf16: the same rounding as at start
            written += 1
        for key, (down, up) in factors.items():
            base, out, scratch = self._matrices[key]
            if up.dtype != torch.float32:
                up, down = up.float(), down.float()
            if scratch is None:
                torch.addmm(base, up, down, out=out)
            else:  # W0 + B @ A in float32, rounded once into the bf16 buffer
                out.copy_(torch.addmm(base, up, down, out=scratch))
            written += 1
        self.touched = frozenset(factors)
        self.signature = plan.signature if plan is not None else ()
        return written


def _shared_tensor(ov, buffer: torch.Tensor, ov_type) -> Any:
    """An ``ov.Tensor`` over ``buffer``'s memory (the buffer must outlive it)."""
    if buffer.dtype == torch.bfloat16:
        return ov.Tensor(buffer.view(torch.int16).numpy(), list(buffer.shape), ov_type)
    return ov.Tensor(buffer.numpy(), shared_memory=True)


def declare_bf16_inputs(model: Any, keys) -> Any:
    """``model`` with the inputs named in ``keys`` taking bfloat16 tensors (converted in the graph)."""
    ov = openvino()
    present = {p.output(0).get_any_name() for p in model.get_parameters()}
    ppp = ov.preprocess.PrePostProcessor(model)
    for key in keys:
        if key in present:
            ppp.input(key).tensor().set_element_type(ov.Type.bf16)
    return ppp.build()
