"""ONNX Runtime (CPU) UNet with hot-swap by writing into bound weight buffers.

The UNet is exported with every adapter-targetable weight as a graph input
(``onnx_export``, ``weights="inputs"``). Each such input is bound once, through
an ``IOBinding``, to an ``OrtValue`` that shares memory with a numpy buffer; a
swap writes ``W0 + B @ A`` (from the pristine base tensor, never from the
previous blend) into those buffers in place. No session is created or re-bound
on a swap, and a step costs the same whatever blend is loaded.

``OrtUnet`` is called like a diffusers UNet in ``server.engine.denoise``
(``unet(sample, t, encoder_hidden_states=..., return_dict=False)[0]``);
``with_unet`` gives a pipeline view whose UNet is this one. Only ``unet.*``
keys are written here; the text encoders stay in torch. A UNet with added
conditioning (SDXL) takes ``added_cond_kwargs`` as two more inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from server.backends.host_weights import HostWeights
from server.backends.onnx_export import (
    HIDDEN,
    OUTPUT,
    SAMPLE,
    TIMESTEP,
    ExportSettings,
    added_values,
    export_unet,
    target_tensors,
    unet_targets,
)
from server.backends.pipeline_view import PipelineView, unet_config
from server.engine.plan import BlendPlan


class OrtUnet:
    """The UNet forward on ONNX Runtime, with its target weights in shared, bound buffers."""

    def __init__(self, pipeline, fingerprint: str, *, threads: int | None = None, folder=None) -> None:
        import onnxruntime as ort

        unet = pipeline.unet
        self.exported = export_unet(pipeline, fingerprint, ExportSettings(weights="inputs"), folder=folder)
        targets = unet_targets(pipeline)
        # The base's own tensors, weights and biases (copied once: the torch model may be swapped by the
        # engine).
        pristine = {key: tensor.clone() for key, tensor in target_tensors(targets).items()}
        self._weights = HostWeights(pristine)
        self.bias_keys = frozenset(self.exported.bias_keys)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        # Idle pool threads would otherwise spin after each run and starve torch's kernels.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(self.exported.path), options, providers=["CPUExecutionProvider"]
        )
        self._binding = self.session.io_binding()
        # Keep the OrtValues alive: they alias the buffers written on every swap.
        self._values = {key: ort.OrtValue.ortvalue_from_numpy(self.buffer(key)) for key in self._weights.keys}
        for key, value in self._values.items():
            self._binding.bind_ortvalue_input(key, value)
        self.config = unet_config(unet)
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    @property
    def weight_keys(self) -> tuple[str, ...]:
        return self._weights.keys

    @property
    def signature(self) -> tuple[tuple[str, float], ...]:
        """The blend the buffers hold (``()``: the base)."""
        return self._weights.signature

    def buffer(self, key: str) -> np.ndarray:
        """The bound buffer of ``key`` (what the session reads on the next call)."""
        return self._weights.buffer(key).numpy()

    def apply(self, plan: BlendPlan | None) -> int:
        """Write ``plan``'s UNet weights (``None``: base) into the bound buffers; returns modules written."""
        return self._weights.apply(plan)

    def __call__(
        self,
        sample,
        timestep,
        encoder_hidden_states=None,
        added_cond_kwargs: dict | None = None,
        return_dict: bool = False,
        **_: Any,
    ):
        batch = sample.shape[0]
        steps = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch)
        added = self.exported.added_inputs
        inputs = (sample, steps, encoder_hidden_states, *added_values(added, added_cond_kwargs))
        binding = self._binding
        for name, tensor in zip((SAMPLE, TIMESTEP, HIDDEN, *added), inputs, strict=True):
            binding.bind_cpu_input(name, np.ascontiguousarray(tensor.detach().to(torch.float32).numpy()))
        binding.bind_output(OUTPUT)
        self.session.run_with_iobinding(binding)
        out = torch.from_numpy(binding.copy_outputs_to_cpu()[0])
        return (out.to(sample.dtype),)


def with_unet(pipeline, unet) -> Any:
    """``pipeline`` with ``unet`` in place of its UNet, for ``server.engine.denoise``."""
    return PipelineView(pipeline, unet=unet)
