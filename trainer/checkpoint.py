"""Resumable checkpoints: everything a run needs to continue as if never stopped.

A checkpoint is a folder ``checkpoint-<step>`` holding the LoRA weights
(``lora.safetensors``), the optimizer, LR-scheduler, grad-scaler and RNG states
(``state.pt``, read back with ``weights_only=True``: plain tensors and numbers,
never arbitrary objects) and ``trainer.json`` (step, options, losses). It is
written to a temporary folder and renamed into place, so a crash mid-write
leaves no checkpoint that looks complete. The data order needs no saved state:
it is a function of the seed and the step.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from adapters.errors import FailedPrecondition, NotFound

PREFIX = "checkpoint-"
# Options that must match for a resumed run to equal an uninterrupted one.
MUST_MATCH = (
    "base",
    "network",
    "dora",
    "rank",
    "alpha",
    "targets",
    "train_text_encoder",
    "steps",
    "epochs",
    "lr",
    "text_encoder_lr",
    "text_encoder_2_lr",
    "lr_scheduler",
    "warmup_steps",
    "batch_size",
    "grad_accum",
    "seed",
    "resolution",
    "buckets",
)


@dataclass
class Checkpoint:
    path: Path
    step: int
    network: dict[str, torch.Tensor]
    state: dict[str, Any]
    info: dict[str, Any]


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"{PREFIX}{step:07d}"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def save_checkpoint(
    folder: Path,
    *,
    step: int,
    network: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any,
    info: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and delete all but the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(folder, step)
    staging = folder / f".{final.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file({k: v.contiguous().cpu() for k, v in network.items()}, str(staging / "lora.safetensors"))
    state = {
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "torch_rng": torch.random.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
    }
    torch.save(state, staging / "state.pt")
    (staging / "trainer.json").write_text(json.dumps({"step": step, **info}, indent=1, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(resume: str, folder: Path) -> Path:
    """``latest`` -> the newest checkpoint in ``folder``; otherwise a checkpoint folder path."""
    if resume == "latest":
        found = list_checkpoints(folder)
        if not found:
            raise NotFound(f"no checkpoint to resume from in {folder}; train without --resume to start fresh")
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / "trainer.json").is_file():
        raise NotFound(
            f"{path} is not a checkpoint folder (no trainer.json); give a {PREFIX}N folder or 'latest'"
        )
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    info = json.loads((path / "trainer.json").read_text())
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    network = load_file(str(path / "lora.safetensors"))
    return Checkpoint(path=path, step=int(info["step"]), network=network, state=state, info=info)


def check_compatible(checkpoint: Checkpoint, options: dict[str, Any]) -> None:
    saved = checkpoint.info.get("options", {})
    differ = [k for k in MUST_MATCH if k in saved and saved[k] != options.get(k)]
    if differ:
        detail = ", ".join(f"{k}: {saved[k]!r} then, {options.get(k)!r} now" for k in differ)
        raise FailedPrecondition(
            f"cannot resume from {checkpoint.path}: options changed ({detail}); "
            "resume with the options the run started with, or start a new run"
        )


def restore_rng(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    python_rng = state["python_rng"]
    random.setstate((python_rng[0], tuple(python_rng[1]), python_rng[2]))
