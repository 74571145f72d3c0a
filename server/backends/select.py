"""Choosing the UNet backend the engine runs its denoising loop on."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from adapters.errors import InvalidArgument
from server.engine.fuse import BlendPlan

# "tensorrt" exists (server.backends.tensorrt_backend) but is not selectable until it has run on a GPU.
BACKENDS = ("torch", "onnxruntime")


class UnetBackend(Protocol):
    """A UNet called like diffusers' in ``server.engine.denoise``, hot-swapped by ``apply``."""

    config: Any
    device: torch.device

    def apply(self, plan: BlendPlan | None) -> int: ...

    def __call__(self, sample, timestep, encoder_hidden_states=None, return_dict: bool = False) -> tuple: ...


def unet_backend(name: str, base: Any) -> UnetBackend | None:
    """The backend ``name`` for ``base`` (a ``BaseModel``); ``None`` for torch (the pipeline's own UNet).

    Build it before any blend is applied: it copies the base's UNet weights as its pristine ``W0``.
    """
    if name == "torch":
        return None
    if name == "onnxruntime":
        if base.device.type != "cpu" or base.dtype != torch.float32:
            raise InvalidArgument(
                f"backend onnxruntime runs float32 on the CPU; the model is {base.dtype} on {base.device}: "
                "use device=cpu dtype=float32, or backend=torch"
            )
        from server.backends.onnxruntime_backend import OrtUnet

        return OrtUnet(base.pipeline, base.fingerprint, threads=torch.get_num_threads())
    raise InvalidArgument(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")


def with_backend(pipeline: Any, unet: UnetBackend | None) -> Any:
    """``pipeline`` itself for torch, else a view of it whose UNet is ``unet``."""
    if unet is None:
        return pipeline
    from server.backends.onnxruntime_backend import with_unet

    return with_unet(pipeline, unet)
