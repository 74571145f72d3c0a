"""Choosing the backend the engine runs its denoising loop on.

A backend replaces the UNet call (and, for OpenVINO, the VAE decoder); the
text encoder stays in torch, where the engine's fused path writes text-encoder
adapter keys. ``unet.*`` keys go to the backend's UNet only: the torch UNet is
then never written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from adapters.errors import InvalidArgument
from server.backends.pipeline_view import with_components
from server.engine.fuse import BlendPlan

# "tensorrt" exists (server.backends.tensorrt_backend) but is not selectable until it has run on a GPU.
BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")  # the CPU backends' compute precision; torch follows the model's dtype


class UnetBackend(Protocol):
    """A UNet called like diffusers' in ``server.engine.denoise``, hot-swapped by ``apply``."""

    config: Any
    device: torch.device

    def apply(self, plan: BlendPlan | None) -> int: ...

    def __call__(self, sample, timestep, encoder_hidden_states=None, return_dict: bool = False) -> tuple: ...


@dataclass(frozen=True)
class Backend:
    """What runs a request: ``unet``/``vae`` replace the pipeline's (``None``: torch's own)."""

    name: str
    precision: str
    unet: UnetBackend | None = None
    vae: Any | None = None

    @property
    def label(self) -> str:
        """``torch``, ``onnxruntime`` or e.g. ``openvino (bf16)``."""
        return f"{self.name} ({self.precision})" if self.name == "openvino" else self.name

    def view(self, pipeline: Any) -> Any:
        """``pipeline`` itself for torch, else a view of it with this backend's components."""
        return with_components(pipeline, unet=self.unet, vae=self.vae)


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


def build_backend(name: str, base: Any, precision: str = "fp32", *, folder=None) -> Backend:
    """The backend ``name`` for ``base`` (a ``BaseModel``), at ``precision``.

    Build it before any blend is applied: it takes the base's UNet weights as its pristine ``W0``.
    ``folder`` overrides where exports are cached (default: the data folder's cache).
    """
    check_backend(name, precision)
    if name == "torch":
        return Backend(name, precision)
    if base.device.type != "cpu" or base.dtype != torch.float32:
        raise InvalidArgument(
            f"backend {name} runs on the CPU from float32 weights; the model is {base.dtype} on "
            f"{base.device}: use device=cpu dtype=float32, or backend=torch"
        )
    threads = torch.get_num_threads()
    if name == "onnxruntime":
        from server.backends.onnxruntime_backend import OrtUnet

        return Backend(
            name, precision, unet=OrtUnet(base.pipeline, base.fingerprint, threads=threads, folder=folder)
        )
    from server.backends.openvino_backend import OvUnet
    from server.backends.openvino_vae import OvVaeDecoder

    unet = OvUnet(base.pipeline, base.fingerprint, precision=precision, threads=threads, folder=folder)
    vae = OvVaeDecoder(
        base.pipeline.vae, base.fingerprint, precision=unet.precision, threads=threads, folder=folder
    )
    return Backend(name, unet.precision, unet=unet, vae=vae)
