"""OpenVINO GenAI's ``Text2ImagePipeline`` as a peer: one exported folder, kohya adapter files.

Two pipelines over the same folder, as a user would build them:

- ``base``: no adapters registered (GenAI's base speed);
- ``lora``: every adapter registered at compile time (GenAI's default adapter mode,
  dynamic LoRA on the CPU); a request's blend is an ``AdapterConfig`` of alphas.

Noise comes from ``TorchGenerator(seed)``, which draws like ``torch.randn`` on a seeded
generator, so with the same Euler schedule GenAI's f32 image matches loraloom's torch
image within a level or two: images of the two sides can be compared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters.errors import FailedPrecondition


@dataclass(frozen=True)
class Settings:
    """What every request of a comparison shares."""

    prompt: str
    size: int
    steps: int
    guidance_scale: float
    seed: int


def genai_missing() -> str | None:
    """Why OpenVINO GenAI cannot run here (``None``: it can)."""
    try:
        import openvino_genai  # noqa: F401
    except ImportError as error:
        return f"openvino_genai is not importable ({error}): pip install -e '.[bench]'"
    return None


def default_precision() -> str:
    """The CPU plugin's default inference precision here (``bf16`` where the CPU has it, else ``f32``)."""
    import openvino

    return openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


class GenaiPeer:
    """GenAI pipelines over ``folder`` with ``adapters`` (name -> kohya file) registered on ``lora``."""

    def __init__(
        self,
        folder: Path,
        adapters: Mapping[str, Path],
        *,
        threads: int = 0,
        precision: str | None = None,
        with_base: bool = True,
    ) -> None:
        """``precision`` (``f32``/``bf16``): the runtime's precision hint; ``None`` keeps GenAI's default."""
        missing = genai_missing()
        if missing:
            raise FailedPrecondition(missing)
        import openvino_genai

        self._genai = openvino_genai
        properties: dict[str, Any] = {}
        if threads > 0:
            properties["INFERENCE_NUM_THREADS"] = threads
        if precision:
            properties["INFERENCE_PRECISION_HINT"] = precision
        self.precision = precision or default_precision()
        self.adapters = {name: openvino_genai.Adapter(str(path)) for name, path in adapters.items()}
        self.base = openvino_genai.Text2ImagePipeline(str(folder), "CPU", **properties) if with_base else None
        self.lora = None
        if self.adapters:
            registered = openvino_genai.AdapterConfig()
            for adapter in self.adapters.values():
                registered.add(adapter, 0.0)
            self.lora = openvino_genai.Text2ImagePipeline(
                str(folder), "CPU", adapters=registered, **properties
            )

    def config(self, blend: Sequence[tuple[str, float]]) -> Any:
        """The ``AdapterConfig`` of a blend (adapter name, alpha)."""
        config = self._genai.AdapterConfig()
        for name, alpha in blend:
            config.add(self.adapters[name], float(alpha))
        return config

    def generate(self, settings: Settings, blend: Sequence[tuple[str, float]] | None = None) -> np.ndarray:
        """One image (H x W x 3, uint8). ``blend=None``: the ``base`` pipeline; a list: ``lora`` with it."""
        if blend is None:
            if self.base is None:
                raise FailedPrecondition("this peer was built without its base pipeline (with_base=False)")
            pipeline, extra = self.base, {}
        else:
            if self.lora is None:
                raise FailedPrecondition("no adapters were registered with this peer")
            pipeline, extra = self.lora, {"adapters": self.config(blend)}
        image = pipeline.generate(
            settings.prompt,
            width=settings.size,
            height=settings.size,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            generator=self._genai.TorchGenerator(settings.seed),
            **extra,
        )
        return np.array(image.data[0])
