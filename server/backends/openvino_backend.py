"""OpenVINO (CPU) UNet with hot-swap by writing into weight tensors shared with the runtime.

The UNet is exported with every adapter-targetable weight as a graph input
(``onnx_export``, ``weights="inputs"``: each input is named by its canonical
key). Each such input is set once, on each infer request, to an ``ov.Tensor``
that shares memory with a host buffer; a swap writes ``W0 + B @ A`` (from the
pristine base, never from the previous blend) into those buffers in place. No
model is recompiled and no request is created on a swap.

Precision (``openvino_runtime``): with ``"bf16"`` the weight inputs are declared
bfloat16, so the buffers hold bfloat16 and a step converts no weight; a swap
computes in float32 and rounds once into the buffer.

Two compiled variants share the buffers. The CPU plugin repacks a 3x3
convolution's weights on every call when they are an input (measured on
``small``: +20 % per step), so the *lean* variant holds the spatial
convolutions, and every target's bias, as constants at their base values and
takes only the other targets as inputs; it runs while the blend leaves every
spatial convolution and bias at its base (attention/linear LoRA, the usual
kind). At bf16 each of its spatial convolutions is a bf16 ``Convolution`` over
``W0`` itself, its bias added in bf16 right after it (the plugin fuses the two and
rounds once, as on its float32-weight path) and the sum widened to float32
(``_bf16_convolution``); a bf16 constant behind a ``Convert`` would be folded by the
plugin into a float32 copy (SD 1.5: 2.2 GB). A blend that touches one
(LoCon-style, or a full diff that changes biases) runs on the *full* variant,
where every target and bias is an input. Both are compiled for static shapes,
once per (variant, input shapes) the first time it is used, and kept. A UNet with
added conditioning (SDXL) takes its ``added_cond_kwargs`` (``text_embeds``,
``time_ids``) as two more inputs (``onnx_export.added_inputs``).

Blend slots: ``slots`` sets of weight buffers, each bound to its own infer
requests (``slots=2`` by default). A swap to a blend some slot already holds
only selects that slot's requests (no write at all, like the torch path's
materialized blends); otherwise the least recently used other slot is rewritten
from base. Alternating between two blends thus costs nothing after the first
time. A slot holds its own buffer of every target but the spatial convolutions
and biases, which read ``W0`` in place (the lean variant's constants hold those
values) until a blend changes them: a LoCon blend allocates the ones it changes
and rebinds them, the next usual blend drops them (``HostWeights``' lazy keys;
SD 1.5 bf16: 0.6 GB a slot, was 1.6). Each request holds its own activations.
``select.build_backend`` keeps the second slot only when one slot fits the plan
budget (40 % of the memory beside the model), and logs the choice.

Memory (``memory_bytes()``, per kind; MiB on ``small`` measured, GB on SD 1.5 from
its parameter counts: UNet 860 M, CLIP-L 123 M, VAE 84 M):

============================  ===========  ==========  =======================
copy                          small fp32   small bf16  SD 1.5 bf16
============================  ===========  ==========  =======================
UNet ``W0`` (``pristine``)    131 (torch)  65.5        1.7 (was 3.4: torch's)
torch UNet target weights     shared       freed       freed (was 3.4)
one blend slot (eager part)   < 131        < 65.5      0.6 measured (was 1.6)
its LoCon convs (``locon``)   only those a LoCon blend changes (20 convs: 0.25)
bf16 blend scratch, a slot    0            4.5         0.05 (was 0.11)
text encoder ``W0`` + buffer  3 + 3        1.5 + 1.5   0.17 + 0.17 (was 0.34 + 0.17)
compiled lean UNet (convs)    plugin's     plugin's    1.1 repacked bf16 (was + 2.2 f32
                                                       folded); + 1.0 when imported from a
                                                       cached blob (its copy, mmapped)
VAE (torch, for img2img)      kept         kept        0.33 (+ compiled decoder)
============================  ===========  ==========  =======================

At bf16 ``W0`` is kept in bf16 (``SharedWeights``): a restore copies it, so the
base comes back bit for bit, and a blend is ``bf16(float32(W0) + update)``. The
torch modules the backend replaces are then pointed at that ``W0``
(``share_pristine``), freeing their float32 weights (on SD 1.5: 3.4 GB less 1.7);
they keep their shapes and biases, which the engine (built after) reads, but no
longer run in torch. At fp32 ``W0`` is the torch weights themselves (no copy).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import torch

from adapters.errors import InvalidArgument
from server.backends.host_weights import buffer_bytes, is_bias_key
from server.backends.onnx_export import (
    HIDDEN,
    SAMPLE,
    TIMESTEP,
    ExportSettings,
    added_values,
    export_unet,
    target_tensors,
    unet_targets,
)
from server.backends.openvino_runtime import (
    compile_model,
    core,
    effective_precision,
    openvino,
    release_freed_memory,
)
from server.backends.openvino_weights import (
    SharedWeights,
    declare_bf16_inputs,
    share_pristine,
    shared_tensor,
    unshared_torch_bytes,
)
from server.backends.pipeline_view import unet_config
from server.engine.plan import BlendPlan

log = logging.getLogger(__name__)

LEAN, FULL = "lean", "full"


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype of the weight buffers at an effective ``precision`` (biases stay float32)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def slot_bytes(pipeline, precision: str) -> int:
    """What one blend slot's buffers take at an effective ``precision`` under a usual blend: every
    UNet target's weight in ``weight_dtype`` but the spatial convolutions' and the biases (a slot
    holds those only for a blend that changes them: ``lazy``)."""
    tensors = target_tensors(unet_targets(pipeline))
    eager = {key: w for key, w in tensors.items() if not is_bias_key(key) and not is_spatial(w)}
    return buffer_bytes(eager, weight_dtype(precision))


def is_spatial(weight: torch.Tensor) -> bool:
    """A convolution weight with a kernel larger than 1x1 (the plugin repacks those per call)."""
    return weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1)


def _bf16_convolution(ov: Any, parameter: Any, constant: Any) -> None:
    """Make the convolution that reads ``parameter`` a bfloat16 one over ``constant`` (a bf16 ``W0``).

    The plugin folds a bf16 constant behind a ``Convert`` to float32 (SD 1.5: 2.2 GB of spatial
    convolution weights); a bf16 convolution keeps reading ``W0`` as is. Its bias is added in bf16
    right after it, so the plugin fuses the two and rounds once, as on its float32-weight path; a
    ``Convert`` between them would round the sum of the convolution twice (max pixel error 13 on
    the tiny SDXL, past the tolerance). The sum is widened back to float32 for the rest of the
    graph."""
    (target,) = parameter.output(0).get_target_inputs()
    convolution = target.get_node()
    if convolution.get_type_name() != "Convolution" or target.get_index() != 1:
        raise ValueError(f"{parameter.get_friendly_name()}: read by {convolution.get_type_name()}")
    convolution.input(0).replace_source_output(
        ov.opset13.convert(convolution.input_value(0), ov.Type.bf16).output(0)
    )
    convolution.input(1).replace_source_output(constant.output(0))
    convolution.validate_and_infer_types()
    out = convolution.output(0)
    # A ShapeOf reads only the shape (the ONNX Conv's bias is reshaped by the output's rank): kept.
    readers = [r for r in out.get_target_inputs() if r.get_node().get_type_name() != "ShapeOf"]
    bias = _bias_of(readers, convolution.get_output_partial_shape(0).rank.get_length())
    if bias is not None:  # the Add that holds the bias, made bf16 (a float32 constant: folded)
        (reader,) = readers
        add = reader.get_node()
        add.input(1 - reader.get_index()).replace_source_output(
            ov.opset13.convert(bias, ov.Type.bf16).output(0)
        )
        add.validate_and_infer_types()
        out = add.output(0)
        readers = list(out.get_target_inputs())
    widened = ov.opset13.convert(out, ov.Type.f32)
    for reader in readers:
        reader.replace_source_output(widened.output(0))


def _bias_of(readers: list, rank: int) -> Any:
    """The bias a convolution's sole reader adds: an ``Add`` of one value per channel (static shape
    ``[1, C, 1, 1]``: the ONNX ``Conv``'s bias, a reshaped constant in the lean variant); else
    ``None`` (an ``Add`` of activations, a residual, is left in float32)."""
    if len(readers) != 1 or readers[0].get_node().get_type_name() != "Add":
        return None
    add, index = readers[0].get_node(), readers[0].get_index()
    other = add.input_value(1 - index)
    shape = other.get_partial_shape()
    if not shape.is_static or len(shape) != rank:
        return None
    per_channel = all(size == 1 for i, size in enumerate(shape.to_shape()) if i != 1)
    return other if per_channel else None


class OvUnet:
    """The UNet forward on OpenVINO, its target weights in host buffers the runtime reads."""

    def __init__(
        self,
        pipeline,
        fingerprint: str,
        *,
        precision: str = "fp32",
        threads: int | None = None,
        folder=None,
        slots: int = 2,
        compile_cache=None,
    ) -> None:
        """``compile_cache``: the ``CACHE_DIR`` of compiled blobs (``None``: none)."""
        if slots < 1:
            raise InvalidArgument(f"slots={slots}: needs at least one weight set (use 1 or 2)")
        self.precision = effective_precision(precision)
        self.threads = threads
        self.compile_cache = compile_cache
        self.exported = export_unet(pipeline, fingerprint, ExportSettings(weights="inputs"), folder=folder)
        self.weight_dtype = weight_dtype(self.precision)
        self.added = self.exported.added_inputs  # SDXL: text_embeds, time_ids
        targets = unet_targets(pipeline)
        self._spatial = frozenset(key for key, w in target_tensors(targets).items() if is_spatial(w))
        self.bias_keys = frozenset(self.exported.bias_keys)
        # Constants in the lean variant: what a usual blend leaves at its base. A slot holds
        # them only while its blend changes them (they read W0 until then: ``lazy``).
        self._lean_constants = self._spatial | self.bias_keys
        self._slots = [SharedWeights(targets, self.weight_dtype, lazy=self._lean_constants)]
        self._slot_count = slots
        self._active = 0
        self._recent = [0]  # slot indices, least recently used first
        self._targets = targets
        self._source = core().read_model(str(self.exported.path))
        self._models: dict[str, Any] = {}
        self._compiled: dict[tuple, Any] = {}
        self._requests: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self.variant = LEAN if self._lean_constants else FULL
        self.config = unet_config(pipeline.unet)
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    # ------------------------------------------------------------ introspection

    @property
    def weights(self) -> SharedWeights:
        """The weight buffers the next call reads (the active slot's)."""
        return self._slots[self._active]

    @property
    def weight_keys(self) -> tuple[str, ...]:
        return self.weights.keys

    @property
    def signature(self) -> tuple[tuple[str, float], ...]:
        return self.weights.signature

    @property
    def compiled_shapes(self) -> tuple[tuple, ...]:
        """``(variant, sample shape, hidden shape, added shapes)`` of every compiled model, in compile
        order."""
        return tuple(self._compiled)

    def buffer(self, key: str) -> torch.Tensor:
        """The buffer bound to input ``key`` (what the runtime reads on the next call)."""
        return self.weights.buffer(key)

    @property
    def slots(self) -> int:
        """How many blend slots this UNet keeps (at most; made on first use)."""
        return self._slot_count

    def share_pristine(self) -> int:
        """Point the torch modules this replaces at ``W0`` where it is a bf16 copy (their float32
        weights freed; the modules no longer run in torch); returns the bytes freed."""
        return share_pristine(self._targets, self.weights)

    def memory_bytes(self) -> dict[str, int]:
        """The bytes this UNet holds on the host, by kind (the compiled models' own copies apart):
        ``pristine`` (``W0`` of every target, weights and biases), ``slots`` (the buffers of the
        slots made so far but ``locon``), ``locon`` (the spatial convolutions' and biases' buffers
        the slots' blends change: none under a usual blend), ``scratch`` (a bf16 blend's float32
        scratch, per slot), ``torch`` (the torch modules' target weights that are not the
        pristine: freed by ``share_pristine``)."""
        torch_bytes = unshared_torch_bytes(self._targets, self.weights.pristine)
        locon = sum(slot.lazy_bytes for slot in self._slots)
        return {
            "pristine": self.weights.pristine_bytes,
            "slots": sum(slot.nbytes for slot in self._slots) - locon,
            "locon": locon,
            "scratch": sum(slot.scratch_bytes for slot in self._slots),
            "torch": torch_bytes,
        }

    # ------------------------------------------------------------ models

    def _model(self, variant: str) -> Any:
        model = self._models.get(variant)
        if model is None:
            model = self._models[variant] = self._build(variant)
        return model

    def _build(self, variant: str) -> Any:
        ov = openvino()
        model = self._source.clone()
        if variant == LEAN:
            by_name = {p.output(0).get_any_name(): p for p in model.get_parameters()}
            for key in sorted(self._lean_constants):
                parameter = by_name[key]
                w0 = self.weights.pristine[key]
                constant = ov.opset13.constant(shared_tensor(ov, w0), shared_memory=True)
                if w0.dtype == torch.bfloat16 and key in self._spatial:  # read in place, never folded
                    _bf16_convolution(ov, parameter, constant)
                else:
                    if w0.dtype != torch.float32:  # a bf16 W0, widened in the graph (the plugin folds it)
                        constant = ov.opset13.convert(constant, ov.Type.f32)
                    parameter.output(0).replace(constant.output(0))
                model.remove_parameter(parameter)
            model.validate_nodes_and_infer_types()
        if self.weight_dtype == torch.bfloat16:
            model = declare_bf16_inputs(model, self.weights.keys)
        return model

    def request(
        self, variant: str, sample_shape: tuple, hidden_shape: tuple, added_shapes: tuple = ()
    ) -> Any:
        """The active slot's infer request of ``variant`` for these input shapes (made the first time);
        ``added_shapes``: those of the added inputs, in ``self.added``'s order."""
        shapes = (variant, tuple(sample_shape), tuple(hidden_shape), tuple(map(tuple, added_shapes)))
        key = (*shapes, self._active)
        found = self._requests.get(key)
        if found is None:
            with self._lock:
                found = self._requests.get(key)
                if found is None:
                    compiled = self._compiled.get(shapes)
                    if compiled is None:
                        compiled = self._compiled[shapes] = self._compile(*shapes)
                    found = compiled.create_infer_request()
                    names = {name for port in compiled.inputs for name in port.get_names()}
                    self.weights.bind(found, names)
                    self._requests[key] = found
        return found

    def _compile(self, variant: str, sample_shape: tuple, hidden_shape: tuple, added_shapes: tuple) -> Any:
        log.info("compiling the %s OpenVINO UNet (%s) for sample %s", variant, self.precision, sample_shape)
        model = self._model(variant).clone()
        shapes = {SAMPLE: list(sample_shape), TIMESTEP: [sample_shape[0]], HIDDEN: list(hidden_shape)}
        shapes |= {name: list(shape) for name, shape in zip(self.added, added_shapes, strict=True)}
        model.reshape(shapes)
        return compile_model(model, self.precision, self.threads, self.compile_cache)

    # ------------------------------------------------------------ hot-swap

    def apply(self, plan: BlendPlan | None) -> int:
        """Make ``plan``'s UNet weights (``None``: base) the ones read next; returns modules written.

        A slot that holds the blend already is selected as is (0 written); else the
        least recently used other slot (a new one while fewer than ``slots`` exist)
        is rewritten from base.
        """
        signature = plan.signature if plan is not None else ()
        held = [i for i, slot in enumerate(self._slots) if slot.signature == signature]
        written = 0
        if held:
            chosen = held[0]
        else:
            if len(self._slots) < self._slot_count:
                first = self._slots[0]
                self._slots.append(
                    SharedWeights(
                        self._targets, self.weight_dtype, pristine=first.pristine, lazy=self._lean_constants
                    )
                )
                self._recent.insert(0, len(self._slots) - 1)
            chosen = next(i for i in self._recent if i != self._active or len(self._slots) == 1)
            held_before = self._slots[chosen].lazy_bytes
            written = self._slots[chosen].apply(plan)
            if self._slots[chosen].lazy_bytes < held_before:
                release_freed_memory()  # a LoCon blend's convolutions dropped: their pages back
        self._active = chosen
        self._recent.remove(chosen)
        self._recent.append(chosen)
        touched = self.weights.touched
        lean = self._lean_constants
        self.variant = FULL if touched & lean else (LEAN if lean else FULL)
        return written

    # ------------------------------------------------------------ forward

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
        added = added_values(self.added, added_cond_kwargs)
        request = self.request(
            self.variant,
            tuple(sample.shape),
            tuple(encoder_hidden_states.shape),
            tuple(tuple(tensor.shape) for tensor in added),
        )
        ov = openvino()
        steps = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch).contiguous()
        inputs = (sample, steps, encoder_hidden_states, *added)
        for name, tensor in zip((SAMPLE, TIMESTEP, HIDDEN, *self.added), inputs, strict=True):
            array = np.ascontiguousarray(tensor.detach().to(torch.float32).numpy())
            request.set_tensor(name, ov.Tensor(array, shared_memory=True))
        request.infer()
        out = torch.from_numpy(request.get_output_tensor(0).data.copy())
        return (out.to(sample.dtype),)
