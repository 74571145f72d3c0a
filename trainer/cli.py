"""``loraloom train``: the trainer from the command line.

``train_command`` is a plain typer command (``app.command("train")(train_command)``
mounts it); ``app`` runs it standalone (``python -m trainer.cli DATA_DIR ...``).
Every flag is a ``TrainConfig`` field; ``--config FILE.toml`` sets the same fields
and flags given on the command line win. torch and diffusers are imported only
once the command runs, so mounting this module costs nothing at CLI start-up.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import MISSING
from pathlib import Path
from typing import Annotated

import typer

from adapters.errors import InvalidArgument, LoraloomError
from trainer.config import TrainConfig

EXIT_USAGE = 2
SERVER_ENV = "LORALOOM_SERVER"
EXIT_INTERRUPTED = 130


def _help(name: str) -> str:
    """The config field's help, with its default when it has a plain one (rich would eat ``[...]``)."""
    field = TrainConfig.__dataclass_fields__[name]
    text = field.metadata["help"]
    if field.default_factory is not MISSING and name != "base":  # base: its help explains the default
        default = field.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
    else:
        shown = field.default
    if shown in (None, "", [], MISSING) or isinstance(shown, bool) or "default" in text:
        return text  # a bool's default shows in its --x/--no-x pair
    return f"{text} (default: {shown})"


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


def train_command(
    data_dir: Annotated[str | None, typer.Argument(help=_help("data_dir"), show_default=False)] = None,
    name: Annotated[str | None, typer.Option(help=_help("name"))] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML file with these options (flags override it)")
    ] = None,
    base: Annotated[str | None, typer.Option(help=_help("base"))] = None,
    network: Annotated[str | None, typer.Option(help=_help("network"))] = None,
    dora: Annotated[bool | None, typer.Option("--dora/--no-dora", help=_help("dora"))] = None,
    rank: Annotated[int | None, typer.Option(help=_help("rank"))] = None,
    alpha: Annotated[float | None, typer.Option(help=_help("alpha"))] = None,
    targets: Annotated[str | None, typer.Option(help="comma-separated " + _help("targets"))] = None,
    train_text_encoder: Annotated[
        bool | None,
        typer.Option("--train-text-encoder/--no-train-text-encoder", help=_help("train_text_encoder")),
    ] = None,
    steps: Annotated[int | None, typer.Option(help=_help("steps"))] = None,
    epochs: Annotated[int | None, typer.Option(help=_help("epochs"))] = None,
    lr: Annotated[float | None, typer.Option(help=_help("lr"))] = None,
    text_encoder_lr: Annotated[
        float | None, typer.Option("--text-encoder-lr", "--te-lr", help=_help("text_encoder_lr"))
    ] = None,
    text_encoder_2_lr: Annotated[
        float | None, typer.Option("--text-encoder-2-lr", "--te2-lr", help=_help("text_encoder_2_lr"))
    ] = None,
    lr_scheduler: Annotated[str | None, typer.Option(help=_help("lr_scheduler"))] = None,
    warmup_steps: Annotated[int | None, typer.Option(help=_help("warmup_steps"))] = None,
    batch_size: Annotated[int | None, typer.Option(help=_help("batch_size"))] = None,
    grad_accum: Annotated[int | None, typer.Option(help=_help("grad_accum"))] = None,
    resolution: Annotated[int | None, typer.Option(help=_help("resolution"))] = None,
    seed: Annotated[int | None, typer.Option(help=_help("seed"))] = None,
    mixed_precision: Annotated[str | None, typer.Option(help=_help("mixed_precision"))] = None,
    device: Annotated[str | None, typer.Option(help=_help("device"))] = None,
    noise_offset: Annotated[float | None, typer.Option(help=_help("noise_offset"))] = None,
    min_snr_gamma: Annotated[float | None, typer.Option(help=_help("min_snr_gamma"))] = None,
    buckets: Annotated[bool | None, typer.Option("--buckets/--no-buckets", help=_help("buckets"))] = None,
    random_flip: Annotated[
        bool | None, typer.Option("--random-flip/--no-random-flip", help=_help("random_flip"))
    ] = None,
    cache_latents: Annotated[
        bool | None, typer.Option("--cache-latents/--no-cache-latents", help=_help("cache_latents"))
    ] = None,
    trigger_word: Annotated[str | None, typer.Option(help=_help("trigger_word"))] = None,
    caption_dropout: Annotated[float | None, typer.Option(help=_help("caption_dropout"))] = None,
    shuffle_tags: Annotated[
        bool | None, typer.Option("--shuffle-tags/--no-shuffle-tags", help=_help("shuffle_tags"))
    ] = None,
    keep_tokens: Annotated[int | None, typer.Option(help=_help("keep_tokens"))] = None,
    output_dir: Annotated[str | None, typer.Option(help=_help("output_dir"))] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help=_help("checkpoint_every"))] = None,
    resume: Annotated[str | None, typer.Option(help=_help("resume"))] = None,
    validation_prompt: Annotated[
        list[str] | None, typer.Option("--validation-prompt", help="a prompt to sample (repeatable)")
    ] = None,
    sample_steps: Annotated[
        str | None, typer.Option(help=_help("sample_steps") + "; comma-separated")
    ] = None,
    out: Annotated[str | None, typer.Option(help=_help("out"))] = None,
    store: Annotated[str | None, typer.Option(help=_help("store"))] = None,
    server: Annotated[
        str | None,
        typer.Option(
            help=_help("server") + " (default: $LORALOOM_SERVER, like the client commands, unless --store, "
            "--no-register or the config file says where)"
        ),
    ] = None,
    no_register: Annotated[bool | None, typer.Option("--no-register", help=_help("no_register"))] = None,
    description: Annotated[str | None, typer.Option(help=_help("description"))] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="an adapter tag (repeatable)")] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help=_help("progress"))] = None,
) -> None:
    """Train a LoRA on a folder of images and register it where it is served."""
    overrides = {
        "data_dir": data_dir,
        "name": name,
        "base": base,
        "network": network,
        "dora": dora,
        "rank": rank,
        "alpha": alpha,
        "targets": _csv(targets),
        "train_text_encoder": train_text_encoder,
        "steps": steps,
        "epochs": epochs,
        "lr": lr,
        "text_encoder_lr": text_encoder_lr,
        "text_encoder_2_lr": text_encoder_2_lr,
        "lr_scheduler": lr_scheduler,
        "warmup_steps": warmup_steps,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "resolution": resolution,
        "seed": seed,
        "mixed_precision": mixed_precision,
        "device": device,
        "noise_offset": noise_offset,
        "min_snr_gamma": min_snr_gamma,
        "buckets": buckets,
        "random_flip": random_flip,
        "cache_latents": cache_latents,
        "trigger_word": trigger_word,
        "caption_dropout": caption_dropout,
        "shuffle_tags": shuffle_tags,
        "keep_tokens": keep_tokens,
        "output_dir": output_dir,
        "checkpoint_every": checkpoint_every,
        "resume": resume,
        "validation_prompts": validation_prompt or None,
        "sample_steps": [int(s) for s in _csv(sample_steps)] if sample_steps else None,
        "out": out,
        "store": store,
        "server": server,
        "no_register": no_register,
        "description": description,
        "tags": tag or None,
        "progress": progress,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    try:
        train_config = (
            TrainConfig.from_toml(config, **overrides)
            if config
            else TrainConfig.from_dict(overrides, source="flags")
        )
    except (InvalidArgument, ValueError) as error:
        _fail(str(error), EXIT_USAGE)
    train_config = _server_from_environment(train_config)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from trainer.api import train
    from trainer.loop import TrainingInterrupted

    try:
        result = train(train_config)
    except TrainingInterrupted as error:
        _fail(str(error), EXIT_INTERRUPTED)
    except InvalidArgument as error:
        _fail(str(error), EXIT_USAGE)
    except LoraloomError as error:
        _fail(str(error), 1)
    window = max(1, min(20, len(result.losses) // 2))
    typer.echo(
        f"trained {result.name}: {result.steps} steps in {result.seconds:.1f}s "
        f"({result.steps_per_second:.2f} steps/s), loss {result.mean_loss(first=window):.4f} -> "
        f"{result.mean_loss(last=window):.4f}"
    )
    typer.echo(f"adapter: {result.path} (sha256 {result.sha256})")
    for sample in result.samples:
        typer.echo(f"sample: {sample}")
    if result.sample_grid is not None:
        typer.echo(f"sample grid: {result.sample_grid}")
    if result.loss_curve is not None:
        typer.echo(f"loss curve: {result.loss_curve}")
    if result.registration is not None:
        typer.echo(f"registered {result.registration.ref} in {result.registration.where}")


def _server_from_environment(config: TrainConfig) -> TrainConfig:
    """``$LORALOOM_SERVER`` (the client commands' server) when nothing else says where to register."""
    server = os.environ.get(SERVER_ENV, "").strip()
    if not server or config.server or config.store or config.no_register:
        return config
    return dataclasses.replace(config, server=server)


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


app = typer.Typer(add_completion=False, help="Train a LoRA adapter (loraloom's trainer).")
app.command("train")(train_command)


def main() -> None:  # pragma: no cover - thin wrapper
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
