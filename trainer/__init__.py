"""The LoRA trainer: a folder of images in, a validated adapter registered where it is served out.

``train(TrainConfig(data_dir=..., name=...)) -> TrainResult``; ``loraloom train`` is
the same call from the command line (``trainer.cli``). Heavy modules (torch,
diffusers) load on first use, so importing ``trainer`` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer.config import TrainConfig

if TYPE_CHECKING:
    from trainer.api import TrainResult, train
    from trainer.loop import TrainingInterrupted

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "train"]


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainResult"):
        from trainer import api

        return getattr(api, name)
    if name == "TrainingInterrupted":
        from trainer.loop import TrainingInterrupted

        return TrainingInterrupted
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
