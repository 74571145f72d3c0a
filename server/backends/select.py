"""Choosing the backend the engine runs its denoising loop on.

A backend replaces the UNet call (OpenVINO also the text encoders, both of
SDXL's, and the VAE decoder). Adapter keys of a replaced component go to the
backend only: the torch module it replaces is then never written; the engine's
fused path writes the keys of the torch modules that still run (the text
encoders under ONNX Runtime).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from adapters.errors import InvalidArgument
from server.backends.pipeline_view import with_components
from server.engine.plan import BIAS_SUFFIX, BlendPlan
from server.models.families import family_of
from server.models.shapes import lora_targets

log = logging.getLogger(__name__)

MiB = 1 << 20

# "tensorrt" exists (server.backends.tensorrt_backend) but is not selectable until it has run on a GPU.
BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")  # the CPU backends' compute precision; torch follows the model's dtype


class UnetBackend(Protocol):
    """A UNet called like diffusers' in ``server.engine.denoise``, hot-swapped by ``apply``."""

    config: Any
    device: torch.device

    def apply(self, plan: BlendPlan | None) -> int: ...

    def __call__(
        self,
        sample,
        timestep,
        encoder_hidden_states=None,
        added_cond_kwargs: dict | None = None,
        return_dict: bool = False,
    ) -> tuple: ...


# The components whose adapter targets a backend may run, by the pipeline's attribute name; a
# target key starts with ``<name>.`` (``text_encoder.`` never matches ``text_encoder_2.`` keys).
WEIGHTED_PARTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Backend:
    """What runs a request: ``unet``/``text_encoder``/``text_encoder_2``/``vae`` replace the
    pipeline's (``None``: torch's).

    Adapter keys of a replaced component go to it only (``owns``): the engine's fused
    path then writes the rest, into the torch modules that still run.
    """

    name: str
    precision: str
    unet: UnetBackend | None = None
    text_encoder: Any | None = None
    text_encoder_2: Any | None = None  # SDXL's second encoder
    vae: Any | None = None

    @property
    def label(self) -> str:
        """``torch``, ``onnxruntime`` or e.g. ``openvino (bf16)``."""
        return f"{self.name} ({self.precision})" if self.name == "openvino" else self.name

    @property
    def parts(self) -> dict[str, Any]:
        """The components this backend runs whose weights adapters touch, by key prefix."""
        found = {f"{name}.": getattr(self, name) for name in WEIGHTED_PARTS}
        return {prefix: part for prefix, part in found.items() if part is not None}

    @property
    def prefixes(self) -> tuple[str, ...]:
        """Key prefixes of the adapter targets this backend runs."""
        return tuple(self.parts)

    def owns(self, key: str) -> bool:
        """A key of a component this backend runs; a bias key (``<key>.bias``) only where that
        component takes the bias as an input (else the engine refuses a bias difference there)."""
        part = next((part for prefix, part in self.parts.items() if key.startswith(prefix)), None)
        if part is None:
            return False
        return not key.endswith(BIAS_SUFFIX) or key in getattr(part, "bias_keys", ())

    def apply(self, plan: BlendPlan | None) -> int:
        """Write ``plan`` (``None``: base) into this backend's weights; returns modules written."""
        return sum(part.apply(plan) for part in self.parts.values())

    def memory_bytes(self) -> dict[str, dict[str, int]]:
        """What the weighted parts this backend runs hold on the host, by component and kind
        (``OvUnet.memory_bytes``); parts that do not tell are left out."""
        found = {name: getattr(getattr(self, name), "memory_bytes", None) for name in WEIGHTED_PARTS}
        return {name: tell() for name, tell in found.items() if tell is not None}

    def view(self, pipeline: Any) -> Any:
        """``pipeline`` itself for torch, else a view of it with this backend's components."""
        components = {name: getattr(self, name) for name in (*WEIGHTED_PARTS, "vae")}
        return with_components(pipeline, **components)


def choose_backend(
    backend: str, precision: str, device: str, dtype: str = "float32", *, compile: bool = False
) -> tuple[str, str]:
    """Resolve ``auto`` settings to what runs: ``(backend, precision)``.

    ``backend="auto"`` is OpenVINO on a float32 CPU model when the package is
    installed (several times faster per step than torch eager there: ``python -m
    bench backends``), else torch; with ``compile`` (a torch feature) it is torch.
    ``precision="auto"`` is bf16 when that backend is OpenVINO on a CPU with native
    BF16 (images within about 12/255 of fp32), else fp32.
    """
    if backend == "auto":
        wants_openvino = device == "cpu" and dtype == "float32" and not compile
        backend = "openvino" if wants_openvino and _openvino_installed() else "torch"
    if precision == "auto":
        precision = "fp32"
        if backend == "openvino" and _openvino_installed():
            from server.backends.openvino_runtime import cpu_supports_bf16

            precision = "bf16" if cpu_supports_bf16() else "fp32"
    return backend, precision


def _openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def check_backend(name: str, precision: str = "fp32") -> None:
    """Raise ``InvalidArgument`` for an unknown backend or precision, or one the backend cannot run."""
    if name not in BACKENDS:
        raise InvalidArgument(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise InvalidArgument(f"precision {precision!r} is not supported: use one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and name != "openvino":
        raise InvalidArgument(
            f"precision {precision} needs backend openvino; backend {name} runs the model's dtype "
            "(use dtype=bfloat16 for torch)"
        )


def build_backend(
    name: str,
    base: Any,
    precision: str = "fp32",
    *,
    folder=None,
    slot_budget_bytes: int | None = None,
    compile_cache: bool = True,
) -> Backend:
    """The backend ``name`` for ``base`` (a ``BaseModel``), at ``precision``.

    Build it before any blend is applied, and before the engine: it takes the base's weights
    as its pristine ``W0`` (OpenVINO at bf16 keeps ``W0`` in bf16 and points the torch modules it
    replaces at it, freeing their float32 weights: ``share_pristine``).
    ``folder`` overrides where exports are cached (default: the data folder's cache).
    OpenVINO keeps a second blend slot (switching back to it writes nothing) when one
    slot's weights fit in ``slot_budget_bytes`` (``None``: always; the server passes the
    plan budget, 40 % of the memory beside the model), and with ``compile_cache``
    keeps its compiled models in ``<cache>/compiled`` (``openvino_runtime``).
    """
    check_backend(name, precision)
    if name == "torch":
        _refuse_handed_over(base)
        return Backend(name, precision)
    if base.device.type != "cpu" or base.dtype != torch.float32:
        raise InvalidArgument(
            f"backend {name} runs on the CPU from float32 weights; the model is {base.dtype} on "
            f"{base.device}: use device=cpu dtype=float32, or backend=torch"
        )
    if name != "openvino":
        _refuse_handed_over(base)
    threads = torch.get_num_threads()
    if name == "onnxruntime":
        from server.backends.onnxruntime_backend import OrtUnet

        return Backend(
            name, precision, unet=OrtUnet(base.pipeline, base.fingerprint, threads=threads, folder=folder)
        )
    from server.backends.openvino_backend import OvUnet, slot_bytes
    from server.backends.openvino_runtime import compiled_cache, effective_precision, release_freed_memory
    from server.backends.openvino_text import OvTextEncoder, supports
    from server.backends.openvino_vae import OvVaeDecoder

    pipeline, fingerprint = base.pipeline, base.fingerprint
    precision = effective_precision(precision)  # bf16 falls back to fp32 on a CPU without native BF16
    if precision != "bf16":  # a bf16 W0 handed over before serves bf16 only
        _refuse_handed_over(base)
    # A slot's real bytes at the precision that runs (bf16 weights, float32 biases).
    one_slot = slot_bytes(pipeline, precision)
    slots = 2 if slot_budget_bytes is None or one_slot <= slot_budget_bytes else 1
    budget = "no budget" if slot_budget_bytes is None else f"budget {slot_budget_bytes / MiB:.0f} MiB"
    log.info("OpenVINO UNet: %d blend slot(s) of %.0f MiB (%s)", slots, one_slot / MiB, budget)
    cache = compiled_cache(folder) if compile_cache else None
    settings = {"precision": precision, "threads": threads, "folder": folder, "compile_cache": cache}
    unet = OvUnet(pipeline, fingerprint, slots=slots, **settings)
    encoders = {
        component: OvTextEncoder(pipeline, fingerprint, component=component, **settings)
        for component in family_of(pipeline).text_encoders
        if component in WEIGHTED_PARTS and supports(pipeline, component)  # else torch runs it
    }
    vae = OvVaeDecoder(pipeline.vae, fingerprint, **settings)
    # The torch modules OpenVINO replaces keep only W0 (bf16: shared with the backend).
    freed = sum(part.share_pristine() for part in (unet, *encoders.values()))
    release_freed_memory()  # else much of the float32 freed stays in the heap (RSS)
    if freed:
        log.info(
            "OpenVINO holds W0 in %s: the replaced torch weights' %.0f MiB freed", precision, freed / MiB
        )
    return Backend(name, precision, unet=unet, vae=vae, **encoders)


def _refuse_handed_over(base: Any) -> None:
    """Refuse a float32 ``base`` one of whose UNet targets no longer holds float32 weights: an
    OpenVINO bf16 backend took them over (``share_pristine``); the model must be loaded again."""
    if getattr(base, "dtype", None) != torch.float32:
        return
    for key, module in lora_targets(base.pipeline).items():
        if key.startswith("unet.") and module.weight.dtype != torch.float32:
            raise InvalidArgument(
                f"this base's weights were handed to backend openvino ({key} is {module.weight.dtype}): "
                "load the model again"
            )
