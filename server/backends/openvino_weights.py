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
    every target's weight, and the bias of each that has one (``<key>.bias``, float32).

    ``lazy`` keys read ``W0`` until a blend touches them (``HostWeights``); when one's buffer
    is allocated or dropped, its tensor is remade and set again on every request bound."""

    def __init__(
        self,
        targets: Mapping[str, nn.Module],
        dtype: torch.dtype,
        pristine: Mapping[str, torch.Tensor] | None = None,
        lazy: frozenset[str] = frozenset(),
    ) -> None:
        """``pristine``: another set's ``W0`` to share (more blend slots over the same base)."""
        ov = openvino()
        # W0: at float32 the base's own tensors, shared, not copied; nothing writes into them in
        # place (the engine's fused path repoints parameters, and leaves a backend's modules alone).
        # With bf16 buffers the weights' W0 is kept in bf16 (half the bytes; biases stay float32,
        # shared): ``share_pristine`` then points the torch modules at it, freeing their float32.
        if pristine is None:
            pristine = {
                key: w if is_bias_key(key) or dtype == torch.float32 else w.to(dtype)
                for key, w in target_tensors(dict(targets)).items()
            }
        super().__init__(pristine, dtype, lazy)
        self.tensors = {key: shared_tensor(ov, buffer) for key, buffer in self._buffers.items()}
        self._bound: list[tuple[Any, frozenset[str]]] = []

    def bind(self, request: Any, names: set[str]) -> None:
        """Set every tensor whose key is one of the request's input ``names`` (once per request;
        the request is kept, to set a lazy key's tensor again when its memory moves)."""
        keys = frozenset(names) & self.tensors.keys()
        for key in keys:
            request.set_tensor(key, self.tensors[key])
        self._bound.append((request, keys))

    def changed(self, keys: frozenset[str]) -> None:
        ov = openvino()
        for key in keys:
            self.tensors[key] = shared_tensor(ov, self._buffers[key])
        for request, names in self._bound:
            for key in keys & names:
                request.set_tensor(key, self.tensors[key])


def share_pristine(targets: Mapping[str, nn.Module], weights: HostWeights) -> int:
    """Point each of ``targets``' (canonical key -> module) weights at ``weights``' ``W0`` where that
    is a copy in another dtype (bf16), so the module's own float32 weight is freed; returns the
    bytes freed.

    For a component a backend runs instead of torch (never called, never written by the
    engine's fused path): the module keeps its shape and its bias, and the engine, built after,
    takes the shared ``W0`` as its pristine weight too (DoRA's norms, merges), but the module
    no longer runs in torch (a bf16 weight in a float32 module).
    """
    freed = 0
    for key, module in targets.items():
        pristine = weights.pristine.get(key)
        if pristine is None or module.weight.data_ptr() == pristine.data_ptr():
            continue
        if tuple(pristine.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"{key}: W0 of shape {tuple(pristine.shape)}, module {tuple(module.weight.shape)}"
            )
        freed += module.weight.numel() * module.weight.element_size()
        module.weight = nn.Parameter(pristine, requires_grad=False)
    return freed


def shared_tensor(ov, buffer: torch.Tensor) -> Any:
    """An ``ov.Tensor`` over ``buffer``'s memory (float32 or bf16; the buffer must outlive it)."""
    if buffer.dtype == torch.bfloat16:
        return ov.Tensor(buffer.detach().view(torch.int16).numpy(), list(buffer.shape), ov.Type.bf16)
    return ov.Tensor(buffer.detach().numpy(), shared_memory=True)


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


def unshared_torch_bytes(targets, pristine) -> int:
    """Bytes of the torch modules' target weights that are not the backend's ``W0`` (what
    ``share_pristine`` frees)."""
    return sum(
        module.weight.numel() * module.weight.element_size()
        for key, module in targets.items()
        if module.weight.data_ptr() != pristine[key].data_ptr()
    )
