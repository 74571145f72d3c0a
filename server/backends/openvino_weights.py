"""Host weight buffers (:class:`HostWeights`) wrapped as ``ov.Tensor`` inputs of an OpenVINO model.

Each buffer is wrapped once in an ``ov.Tensor`` sharing its memory; a model
sets those tensors on its infer requests once, and every swap after that is a
write into the buffers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from server.backends.host_weights import HostWeights, is_bias_key
from server.backends.onnx_export import target_tensors
from server.backends.openvino_runtime import openvino


class SharedWeights(HostWeights):
    """The buffers of ``targets`` (canonical key -> module) in ``dtype``, each also an ``ov.Tensor``:
    every target's weight, and the bias of each that has one (``<key>.bias``, float32)."""

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
            pristine = target_tensors(dict(targets))
        super().__init__(pristine, dtype)
        self.tensors = {
            key: _shared_tensor(ov, buffer, ov.Type.bf16 if buffer.dtype == torch.bfloat16 else ov.Type.f32)
            for key, buffer in self._buffers.items()
        }

    def bind(self, request: Any, names: set[str]) -> None:
        """Set every tensor whose key is one of the request's input ``names`` (once per request)."""
        for key, tensor in self.tensors.items():
            if key in names:
                request.set_tensor(key, tensor)


def _shared_tensor(ov, buffer: torch.Tensor, ov_type) -> Any:
    """An ``ov.Tensor`` over ``buffer``'s memory (the buffer must outlive it)."""
    if buffer.dtype == torch.bfloat16:
        return ov.Tensor(buffer.view(torch.int16).numpy(), list(buffer.shape), ov_type)
    return ov.Tensor(buffer.numpy(), shared_memory=True)


def declare_bf16_inputs(model: Any, keys) -> Any:
    """``model`` with the weight inputs named in ``keys`` taking bfloat16 tensors (converted in the
    graph); bias inputs stay float32."""
    ov = openvino()
    present = {p.output(0).get_any_name() for p in model.get_parameters()}
    ppp = ov.preprocess.PrePostProcessor(model)
    for key in keys:
        if key in present and not is_bias_key(key):
            ppp.input(key).tensor().set_element_type(ov.Type.bf16)
    return ppp.build()
