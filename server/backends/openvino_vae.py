"""The VAE decoder on OpenVINO (CPU): constant weights (adapters never touch the VAE).

At 256 px the decoder costs as much as several UNet steps in torch; on OpenVINO
it runs 2-5x faster (``bench backends``). The decoder is converted from torch
once (``openvino.convert_model``) and kept as OpenVINO IR
(``openvino_runtime.converted``). It is compiled for static shapes, once per
latent shape.

Compiled blobs (``compile_cache``) are used at fp32 only: OpenVINO 2026.4's bf16
decoder imported from its blob gave wrong images (max error 0.94 of the [-1, 1]
range against 0.02 compiled fresh), and OpenVINO's cache key (graph, constants,
properties, version) does not tell that case apart, so no key of ours could make a
bf16 blob safe. A bf16 decoder is compiled fresh on every start (seconds; it is the
smallest part).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from server.backends.openvino_runtime import (
    PerShape,
    compile_model,
    converted,
    core,
    effective_precision,
    openvino,
)

log = logging.getLogger(__name__)

IR_VERSION = 1  # bump when the converted graph changes


class _Decode(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


def export_vae_decoder(vae: nn.Module, fingerprint: str, *, folder: Path | None = None) -> Path:
    """The decoder as OpenVINO IR (converted the first time, then read from the cache)."""

    def convert():
        example = torch.zeros(1, vae.config.latent_channels, 8, 8)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings on diffusers' shape checks
            return openvino().convert_model(_Decode(vae.eval()), example_input=example)

    return converted("vae_decoder", fingerprint, convert, version=IR_VERSION, folder=folder)


class OvVaeDecoder:
    """Called like a diffusers VAE in ``server.engine.denoise``: ``decode(latents)`` and ``config``;
    ``encode`` (img2img and inpainting, once per image) runs on the torch VAE it was made from."""

    def __init__(
        self,
        vae: nn.Module,
        fingerprint: str,
        *,
        precision: str = "fp32",
        threads: int | None = None,
        folder: Path | None = None,
        compile_cache: Path | None = None,
    ) -> None:
        """``compile_cache``: the ``CACHE_DIR`` of compiled blobs (``None``: none); ignored at bf16."""
        self.precision = effective_precision(precision)
        self.threads = threads
        self.folder = folder
        self.compile_cache = compile_cache if self.precision == "fp32" else None
        self.path = export_vae_decoder(vae, fingerprint, folder=folder)
        self._source = core().read_model(str(self.path))
        self._requests = PerShape(self._compile)
        self.config = vae.config
        self._torch_vae = vae
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    @property
    def compiled_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self._requests.shapes

    def request(self, shape: tuple[int, ...]) -> Any:
        """The infer request for latents of ``shape`` (compiled the first time)."""
        return self._requests.get(shape)[1]

    def prepare(self, shape: tuple[int, ...]) -> None:
        """Compile for latents of ``shape`` now (the server's warm-up), without decoding."""
        self.request(shape)

    def _compile(self, shape: tuple[int, ...]) -> tuple[Any, Any]:
        log.info("compiling the OpenVINO VAE decoder (%s) for latents %s", self.precision, shape)
        model = self._source.clone()
        model.reshape({0: list(shape)})
        compiled = compile_model(model, self.precision, self.threads, self.compile_cache)
        return compiled, compiled.create_infer_request()  # the request's model stays referenced

    def encode(self, images: torch.Tensor, return_dict: bool = True) -> Any:
        return self._torch_vae.encode(images, return_dict=return_dict)

    def decode(self, latents: torch.Tensor, return_dict: bool = False, generator: Any = None) -> tuple:
        request = self.request(tuple(latents.shape))
        array = np.ascontiguousarray(latents.detach().to(torch.float32).numpy())
        request.set_input_tensor(openvino().Tensor(array, shared_memory=True))
        request.infer()
        out = torch.from_numpy(request.get_output_tensor(0).data.copy())
        return (out.to(latents.dtype),)
