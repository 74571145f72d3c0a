"""A pipeline with some components run elsewhere, for ``server.engine.denoise``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class UnetConfig:
    """What the denoising loop reads from ``unet.config``."""

    in_channels: int
    time_cond_proj_dim: int | None
    sample_size: int
    addition_embed_type: str | None = None  # "text_time": SDXL's added conditioning


def unet_config(unet) -> UnetConfig:
    config = unet.config
    return UnetConfig(
        in_channels=config.in_channels,
        time_cond_proj_dim=config.time_cond_proj_dim,
        sample_size=config.sample_size,
        addition_embed_type=getattr(config, "addition_embed_type", None),
    )


class PipelineView:
    """``pipeline`` with some components (``unet``, the text encoders, ``vae``) replaced; everything
    else is the original's."""

    def __init__(self, pipeline, **components: Any) -> None:
        self._pipeline = pipeline
        for name, component in components.items():
            setattr(self, name, component)

    def __getattr__(self, name: str):
        return getattr(self._pipeline, name)


def with_components(pipeline, **components: Any) -> Any:
    """``pipeline`` itself when no component is given (or all are ``None``), else a view."""
    given = {name: component for name, component in components.items() if component is not None}
    return PipelineView(pipeline, **given) if given else pipeline
