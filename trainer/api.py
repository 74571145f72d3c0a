"""The library entry point: ``train(config) -> TrainResult``, the CLI's whole job without the CLI."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from adapters.canonical import LoraAdapter
from adapters.errors import LoraloomError
from server.models.loader import BaseModel
from trainer.config import TrainConfig
from trainer.export import build_adapter, kohya_metadata, write_file
from trainer.loop import StepInfo, Trainer
from trainer.register import Registration, register_in_store, upload_to_server

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run produced and where it went."""

    name: str
    steps: int
    losses: list[float]
    adapter: LoraAdapter = field(repr=False)
    data: bytes = field(repr=False)
    sha256: str
    path: Path
    registration: Registration | None
    samples: list[Path]
    checkpoints: list[Path]
    seconds: float
    resumed_from: int = 0
    loss_curve: Path | None = None  # loss-curve.png next to the checkpoints
    sample_grid: Path | None = None  # sample-grid.png: prompts x sample steps

    @property
    def steps_per_second(self) -> float:
        run = self.steps - self.resumed_from
        return run / self.seconds if self.seconds > 0 else 0.0

    def mean_loss(self, first: int | None = None, last: int | None = None) -> float:
        values = self.losses[:first] if first is not None else self.losses[-last:] if last else self.losses
        return sum(values) / len(values) if values else float("nan")


def train(
    config: TrainConfig,
    *,
    base: BaseModel | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Train, export (validated), write the file and register it as the config says.

    ``base``: an already-loaded base model to train on (it is modified: LoRA
    layers are injected), else ``config.base`` is loaded. ``on_step`` is called
    after every optimizer step. Ctrl-C raises ``TrainingInterrupted`` after a
    checkpoint is saved; resume with ``config.resume = "latest"``.
    """
    trainer = Trainer(config, base=base)
    outcome = trainer.run(on_step)
    modules = trainer.network.to_canonical()
    metadata = kohya_metadata(
        config,
        base=trainer.base,
        dataset=trainer.dataset,
        steps=outcome.steps,
        total_steps=outcome.total_steps,
        epoch=-(-outcome.steps * config.grad_accum // max(1, trainer.batches_per_epoch)),
        batches_per_epoch=trainer.batches_per_epoch,
        resolution=trainer.resolution,
        has_conv=trainer.network.has_conv,
        final_loss=outcome.losses[-1] if outcome.losses else None,
        text_encoder_lrs=trainer.text_encoder_lrs,
    )
    metadata.update(trainer.network.kohya_metadata())  # LoHa, LoKr, DoRA: lycoris.kohya and its algo
    exported = build_adapter(modules, metadata, trainer.base)
    path = write_file(exported.data, config.out or trainer.output_dir / f"{config.adapter_name}.safetensors")
    log.info("wrote %s (sha256 %s)", path, exported.sha256)
    try:
        registration = _register(config, exported.data, trainer, outcome)
    except LoraloomError as error:
        hint = f"the trained adapter is saved at {path}; upload it once the cause is fixed"
        raise _with_hint(error, hint) from error
    return TrainResult(
        name=config.adapter_name,
        steps=outcome.steps,
        losses=outcome.losses,
        adapter=exported.adapter,
        data=exported.data,
        sha256=exported.sha256,
        path=path,
        registration=registration,
        samples=outcome.samples,
        checkpoints=outcome.checkpoints,
        seconds=outcome.seconds,
        resumed_from=outcome.resumed_from,
        loss_curve=outcome.loss_curve,
        sample_grid=outcome.sample_grid,
    )


def _with_hint(error: LoraloomError, hint: str) -> LoraloomError:
    """The same error (same type, same attributes) with ``hint`` appended to its message."""
    extended = type(error).__new__(type(error))
    extended.__dict__.update(error.__dict__)
    extended.args = (f"{error}; {hint}", *error.args[1:])
    return extended


def _training_summary(config: TrainConfig, trainer: Trainer, outcome) -> dict:
    losses = outcome.losses
    window = max(1, min(20, len(losses) // 2))
    return {
        "trainer": "loraloom",
        "steps": outcome.steps,
        "seconds": round(outcome.seconds, 3),
        "loss_first": sum(losses[:window]) / window if losses else None,
        "loss_last": sum(losses[-window:]) / window if losses else None,
        "base_model": trainer.base.name,
        "base_fingerprint": trainer.base.fingerprint,
        "images": len(trainer.dataset),
        "options": {k: v for k, v in config.to_dict().items() if k not in ("progress",)},
    }


def _register(config: TrainConfig, data: bytes, trainer: Trainer, outcome) -> Registration | None:
    if config.no_register:
        return None
    summary = _training_summary(config, trainer, outcome)
    trigger_words = [config.trigger_word] if config.trigger_word else []
    if config.server:
        registration = upload_to_server(
            data,
            config.adapter_name,
            server=config.server,
            description=config.description,
            tags=config.tags,
            trigger_words=trigger_words,
            metadata={
                k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in summary.items()
            },
        )
    else:
        registration = register_in_store(
            data,
            config.adapter_name,
            store=config.store,
            description=config.description,
            tags=config.tags,
            trigger_words=trigger_words,
            base_model=trainer.base.architecture,
            training_metadata=summary,
        )
    log.info("registered %s in %s", registration.ref, registration.where)
    return registration
