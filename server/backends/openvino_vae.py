"""The VAE decoder on OpenVINO (CPU): constant weights (adapters never touch the VAE).

At 256 px the decoder costs as much as several UNet steps in torch; on OpenVINO
it runs 2-5x faster (``bench backends``). The decoder is converted from torch
once (``openvino.convert_model``) and kept as OpenVINO IR (float32 weights)
under ``LORALOOM_HOME/cache/openvino/<key>/``, where the key hashes the base
model's fingerprint and the converter versions. It is compiled for static
shapes, once per latent shape.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from server.backends.openvino_runtime import cache_folder, compile_model, core, effective_precision, openvino

log = logging.getLogger(__name__)

IR_FORMAT = 1  # bump when the converted graph changes
FILE = "vae_decoder.xml"


class _Decode(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


def ir_key(fingerprint: str) -> str:
    """The cache key of a converted decoder: base fingerprint, format, converter versions."""
    ov = openvino()
    text = json.dumps(
        {
            "fingerprint": fingerprint,
            "format": IR_FORMAT,
            "openvino": ov.__version__,
            "torch": torch.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def export_vae_decoder(vae: nn.Module, fingerprint: str, *, folder: Path | None = None) -> Path:
    """The decoder as OpenVINO IR (converted the first time, then read from the cache)."""
    ov = openvino()
    root = cache_folder(folder) / ir_key(fingerprint)
    path = root / FILE
    if path.is_file():
        return path
    channels = vae.config.latent_channels
    example = torch.zeros(1, channels, 8, 8)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=root.parent))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings on diffusers' shape checks
            model = ov.convert_model(_Decode(vae.eval()), example_input=example)
        ov.save_model(model, str(staging / FILE), compress_to_fp16=False)
        try:
            os.rename(staging, root)
        except OSError:  # another process converted it first: use theirs
            if not path.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


class OvVaeDecoder:
    """Called like a diffusers VAE in ``server.engine.denoise``: ``decode(latents)`` and ``config``."""

    def __init__(
        self,
        vae: nn.Module,
        fingerprint: str,
        *,
        precision: str = "fp32",
        threads: int | None = None,
        folder: Path | None = None,
    ) -> None:
        self.precision = effective_precision(precision)
        self.threads = threads
        self.folder = folder
        self.path = export_vae_decoder(vae, fingerprint, folder=folder)
        self._source = core().read_model(str(self.path))
        self._compiled: dict[tuple[int, ...], tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        self.config = vae.config
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    @property
    def compiled_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(self._compiled)

    def request(self, shape: tuple[int, ...]) -> Any:
        found = self._compiled.get(shape)
        if found is None:
            with self._lock:
                found = self._compiled.get(shape)
                if found is None:
                    log.info("compiling the OpenVINO VAE decoder (%s) for latents %s", self.precision, shape)
                    model = self._source.clone()
                    model.reshape({0: list(shape)})
                    compiled = compile_model(model, self.precision, self.threads)
                    found = self._compiled[shape] = (compiled, compiled.create_infer_request())
        return found[1]

    def decode(self, latents: torch.Tensor, return_dict: bool = False, generator: Any = None) -> tuple:
        request = self.request(tuple(latents.shape))
        array = np.ascontiguousarray(latents.detach().to(torch.float32).numpy())
        request.set_input_tensor(openvino().Tensor(array, shared_memory=True))
        request.infer()
        out = torch.from_numpy(request.get_output_tensor(0).data.copy())
        return (out.to(latents.dtype),)
