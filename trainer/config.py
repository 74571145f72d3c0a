"""``TrainConfig``: every training option, with help text, loadable from TOML.

The CLI's flags and a TOML file set the same fields (flag names are the field
names with dashes); flags given on the command line override the file.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.errors import InvalidArgument

# Module-name suffixes PEFT matches (``target_modules``); presets by name.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "ff": ("ff.net.0.proj", "ff.net.2"),
    "proj": ("proj_in", "proj_out"),
    "conv": ("conv1", "conv2", "conv_shortcut"),
}
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LR_SCHEDULERS = ("constant", "cosine", "linear")
# Network types (``trainer.network``); ``locon`` is LoRA with the UNet's conv layers added to the targets.
NETWORKS = ("lora", "locon", "loha", "lokr")
MIXED_PRECISION = ("no", "fp16", "bf16")
DEFAULT_STEPS = 1000
# The base model `loraloom serve` loads unless told otherwise (its LORALOOM_MODEL variable, else tiny):
# an adapter trained with no flags fits the server started with no flags.
BASE_MODEL_ENV = "LORALOOM_MODEL"
DEFAULT_BASE = "toy"


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """What to train, how, and where the result goes."""

    data_dir: str = _opt("", "folder of images with .txt captions or a metadata.jsonl")
    name: str = _opt("", "adapter name in the store (default: the data folder's name)")
    base: str = field(
        default_factory=lambda: os.environ.get(BASE_MODEL_ENV) or DEFAULT_BASE,
        metadata={
            "help": "base model: a built-in name, a diffusers folder or an SD 1.x .safetensors "
            f"(default: ${BASE_MODEL_ENV}, else {DEFAULT_BASE}: what `loraloom serve` loads by default)"
        },
    )
    # Network.
    network: str = _opt(
        "lora", "network type: lora, locon (lora plus the UNet's conv layers), loha or lokr (LyCORIS')"
    )
    dora: bool = _opt(False, "DoRA: also train a magnitude per output row (lora and locon networks)")
    rank: int = _opt(8, "LoRA rank (network dim)")
    alpha: float = _opt(8.0, "LoRA alpha; the update is scaled by alpha / rank")
    targets: list[str] = field(
        default_factory=lambda: ["attn"],
        metadata={
            "help": "UNet modules to adapt: presets attn, ff, proj, conv, or module-name suffixes (to_q)"
        },
    )
    train_text_encoder: bool = _opt(
        False,
        "also train LoRA on the text encoders' attention projections (SDXL: both; a learning rate of 0 "
        "leaves that encoder frozen)",
    )
    # Length and optimizer.
    steps: int | None = _opt(None, f"optimizer steps to train (default {DEFAULT_STEPS} unless epochs is set)")
    epochs: int | None = _opt(None, "train this many passes over the data instead of a step count")
    lr: float = _opt(1e-4, "learning rate (AdamW)")
    text_encoder_lr: float | None = _opt(None, "learning rate for the (first) text encoder (default: lr)")
    text_encoder_2_lr: float | None = _opt(
        None, "learning rate for SDXL's second text encoder (default: text_encoder_lr, else lr)"
    )
    lr_scheduler: str = _opt("constant", "learning-rate schedule: constant, cosine or linear")
    warmup_steps: int = _opt(0, "linear warm-up steps at the start of the schedule")
    weight_decay: float = _opt(1e-2, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "clip gradients to this norm (0 disables)")
    batch_size: int = _opt(1, "images per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step (gradient accumulation)")
    seed: int = _opt(0, "seed of everything random: data order, noise, timesteps, dropout")
    mixed_precision: str = _opt("no", "autocast on CUDA: no, fp16 or bf16 (CPU always trains in fp32)")
    device: str = _opt("auto", "auto, cpu or cuda[:N]")
    noise_offset: float = _opt(0.0, "noise offset (e.g. 0.05) for darker darks and brighter brights")
    min_snr_gamma: float | None = _opt(None, "min-SNR loss weighting gamma (5 is the paper's choice)")
    # Data.
    resolution: int | None = _opt(None, "training resolution in pixels (default: the base model's)")
    buckets: bool = _opt(False, "aspect-ratio buckets instead of square center crops")
    bucket_step: int = _opt(64, "bucket side lengths are multiples of this (pixels)")
    min_bucket: int = _opt(256, "smallest bucket side (pixels)")
    max_bucket: int = _opt(1024, "largest bucket side (pixels)")
    random_flip: bool = _opt(False, "randomly mirror images left-right")
    cache_latents: bool = _opt(
        False,
        "cache VAE latents on disk (<LORALOOM_HOME>/cache/trainer; with random_flip both mirror images) "
        "and, while the text encoders are frozen, the caption embeddings: later epochs and runs skip the "
        "VAE encoder",
    )
    caption_extension: str = _opt(".txt", "caption file extension (kohya convention)")
    trigger_word: str = _opt("", "prepended to every caption (also recorded as the adapter's trigger word)")
    caption_dropout: float = _opt(0.0, "probability of training on an empty caption")
    shuffle_tags: bool = _opt(False, "shuffle comma-separated caption tags each time")
    keep_tokens: int = _opt(0, "keep the first N tags in place when shuffling")
    # Checkpoints and samples.
    output_dir: str = _opt("", "checkpoints and samples go here (default: <LORALOOM_HOME>/training/<name>)")
    checkpoint_every: int = _opt(0, "save a resumable checkpoint every N steps (0: only on Ctrl-C)")
    keep_checkpoints: int = _opt(2, "how many checkpoints to keep (oldest are deleted)")
    resume: str = _opt("", "resume from a checkpoint folder, or 'latest' in output_dir")
    validation_prompts: list[str] = field(
        default_factory=list, metadata={"help": "prompts to sample images from while training"}
    )
    sample_steps: list[int] = field(
        default_factory=list, metadata={"help": "steps at which to sample (the final step is always sampled)"}
    )
    sample_inference_steps: int = _opt(20, "denoising steps per sample image")
    # Output.
    out: str = _opt("", "also write the adapter .safetensors to this file")
    store: str = _opt("", "register into this store (a LORALOOM_HOME folder or a database URL)")
    server: str = _opt("", "upload to a running server at HOST:PORT instead of a local store")
    no_register: bool = _opt(False, "do not register anywhere (use with --out)")
    description: str = _opt("", "adapter description")
    tags: list[str] = field(default_factory=list, metadata={"help": "adapter tags in the store"})
    progress: bool = _opt(True, "show a progress bar")

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read ``path`` (a flat table, or a ``[train]`` table); ``overrides`` win over the file."""
        path = Path(path)
        try:
            with path.open("rb") as handle:
                raw = tomllib.load(handle)
        except OSError as error:
            raise InvalidArgument(f"cannot read config file {path}: {error.strerror or error}") from None
        except tomllib.TOMLDecodeError as error:
            raise InvalidArgument(f"config file {path} is not valid TOML: {error}") from None
        table = raw.get("train", raw)
        if not isinstance(table, dict):
            raise InvalidArgument(f"config file {path}: [train] must be a table")
        values = {key.replace("-", "_"): value for key, value in table.items()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values, source=str(path))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InvalidArgument(
                f"{source}: unknown option(s) {', '.join(unknown)}; known options: {', '.join(known)}"
            )
        config = cls(**{k: _coerce(known[k], v, source) for k, v in values.items()})
        config.check()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ checks and derived values

    def check(self) -> None:
        """Raise ``InvalidArgument`` naming the first option that makes no sense."""
        problems = []
        if not self.data_dir:
            problems.append("data_dir is required: the folder of training images")
        if self.network not in NETWORKS:
            problems.append(f"network must be one of {', '.join(NETWORKS)}, not {self.network!r}")
        elif self.dora and self.network not in ("lora", "locon"):
            problems.append(
                f"dora is trained on lora or locon networks, not {self.network} (PEFT, the trainer's "
                "network library, has DoRA for LoRA only)"
            )
        if self.rank < 1:
            problems.append(f"rank must be at least 1, not {self.rank}")
        if self.alpha <= 0:
            problems.append(f"alpha must be positive, not {self.alpha}")
        if self.steps is not None and self.epochs is not None:
            problems.append("give steps or epochs, not both")
        for name in ("steps", "epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be at least 1, not {value}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, not {self.lr}")
        for name in ("text_encoder_lr", "text_encoder_2_lr"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.append(f"{name} must not be negative, not {value} (0 leaves that encoder frozen)")
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(
                f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, not {self.lr_scheduler!r}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, not {self.mixed_precision!r}"
            )
        for name in ("batch_size", "grad_accum", "bucket_step", "sample_inference_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "keep_tokens", "max_grad_norm", "noise_offset"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, not {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            problems.append(f"keep_checkpoints must be at least 1, not {self.keep_checkpoints}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            problems.append(f"caption_dropout must be between 0 and 1, not {self.caption_dropout}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            problems.append(f"min_snr_gamma must be positive, not {self.min_snr_gamma}")
        if self.resolution is not None and self.resolution < 8:
            problems.append(f"resolution must be at least 8 pixels, not {self.resolution}")
        if not self.targets:
            problems.append("targets is empty: name at least one preset (attn) or module suffix")
        if sum(bool(x) for x in (self.store, self.server)) > 1:
            problems.append("give --store or --server, not both")
        if self.no_register and (self.store or self.server):
            problems.append("no_register contradicts store/server")
        if problems:
            raise InvalidArgument("; ".join(problems))

    @property
    def adapter_name(self) -> str:
        return self.name or Path(self.data_dir).expanduser().resolve().name

    def unet_target_modules(self) -> list[str]:
        """The PEFT ``target_modules`` list: presets expanded, order kept, duplicates dropped."""
        expanded: list[str] = []
        for item in [*self.targets, *(["conv"] if self.network == "locon" else [])]:
            for name in TARGET_PRESETS.get(item, (item,)):
                if name not in expanded:
                    expanded.append(name)
        return expanded


def _coerce(spec: dataclasses.Field, value: Any, source: str) -> Any:
    """Light type checking of TOML / CLI values against the field's default."""
    default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    name = spec.name
    if isinstance(default, list):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            raise InvalidArgument(f"{source}: {name} must be a list, not {value!r}")
        return list(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InvalidArgument(f"{source}: {name} must be true or false, not {value!r}")
        return value
    if isinstance(default, float) or name in ("min_snr_gamma", "text_encoder_lr", "text_encoder_2_lr"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(f"{source}: {name} must be a number, not {value!r}")
        return float(value)
    if isinstance(default, int) or name in ("steps", "epochs", "resolution"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"{source}: {name} must be an integer, not {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise InvalidArgument(f"{source}: {name} must be a string, not {value!r}")
        return value
    return value
