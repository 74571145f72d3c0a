"""The trained adapter as a safetensors file with kohya's ``ss_*`` and Stability's ``modelspec.*`` metadata.

An SDXL adapter is written as kohya's sd-scripts write SDXL LoRAs (SGM UNet names,
``lora_te1_``/``lora_te2_``; ``adapters.formats.to_kohya`` with the base's module names),
so A1111, ComfyUI and diffusers' ``load_lora_weights`` read it as they read kohya's;
SD 1.x and 2.x adapters are written in loraloom's canonical layout, as before.

The file is validated by ``adapters`` twice before anyone sees it: the
in-memory adapter against the base model's shapes, then the serialized bytes
parsed back (the same safe parser the store and the server use).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.canonical import LoraAdapter, LoraModule
from adapters.formats import load_adapter, save_canonical, to_kohya
from adapters.validation import validate_against_base
from server.models.loader import BaseModel
from trainer.config import TrainConfig
from trainer.data import Dataset


@dataclass(frozen=True)
class ExportedAdapter:
    adapter: LoraAdapter
    data: bytes
    sha256: str


def kohya_metadata(
    config: TrainConfig,
    *,
    base: BaseModel,
    dataset: Dataset,
    steps: int,
    total_steps: int,
    epoch: int,
    batches_per_epoch: int,
    resolution: int,
    has_conv: bool,
    final_loss: float | None,
    text_encoder_lrs: Mapping[str, float] | None = None,
) -> dict[str, str]:
    """The ``ss_*`` keys kohya's sd-scripts write (values are strings, JSON where kohya uses JSON), and
    the ``modelspec.*`` keys (:func:`modelspec_metadata`).

    ``text_encoder_lrs``: the text encoders trained and their learning rates (the trainer's; by
    default what ``config`` says for the first encoder)."""
    if text_encoder_lrs is None:
        first = config.lr if config.text_encoder_lr is None else config.text_encoder_lr
        text_encoder_lrs = {"text_encoder": first} if config.train_text_encoder else {}
    family = base.family
    v_prediction = _prediction_type(base) == "v_prediction"
    folder = dataset.root.name or str(dataset.root)
    network_args: dict[str, Any] = {}
    if has_conv:
        network_args = {"conv_dim": str(config.rank), "conv_alpha": str(config.alpha)}
    meta: dict[str, Any] = {
        "ss_output_name": config.adapter_name,
        "ss_training_comment": config.description,
        "ss_sd_model_name": base.name,
        "ss_sd_model_hash": base.fingerprint[:8],
        "ss_new_sd_model_hash": base.fingerprint,
        "ss_base_model_version": family.kohya_version,
        "ss_v2": str(family.name == "sd2"),
        "ss_v_parameterization": str(v_prediction),
        "ss_network_module": "networks.lora",
        "ss_network_dim": config.rank,
        "ss_network_alpha": _number(config.alpha),
        "ss_network_args": json.dumps(network_args) if network_args else "",
        "ss_network_train_unet_only": str(not text_encoder_lrs),
        "ss_learning_rate": config.lr,
        "ss_unet_lr": config.lr,
        "ss_text_encoder_lr": text_encoder_lrs.get("text_encoder", "") if text_encoder_lrs else "",
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": config.warmup_steps,
        "ss_optimizer": f"torch.optim.AdamW(weight_decay={config.weight_decay})",
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_steps": steps,
        "ss_max_train_steps": total_steps,
        "ss_epoch": epoch,
        "ss_num_epochs": -(-total_steps * config.grad_accum // max(1, batches_per_epoch)),
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_batch_size_per_device": config.batch_size,
        "ss_total_batch_size": config.batch_size * config.grad_accum,
        "ss_gradient_accumulation_steps": config.grad_accum,
        "ss_num_train_images": len(dataset),
        "ss_num_reg_images": 0,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_enable_bucket": str(config.buckets),
        "ss_bucket_info": json.dumps(dataset.bucket_info()) if config.buckets else "",
        "ss_min_bucket_reso": config.min_bucket if config.buckets else "",
        "ss_max_bucket_reso": config.max_bucket if config.buckets else "",
        "ss_bucket_no_upscale": "False",
        "ss_cache_latents": str(config.cache_latents),
        "ss_seed": config.seed,
        "ss_mixed_precision": config.mixed_precision,
        "ss_noise_offset": config.noise_offset or "",
        "ss_min_snr_gamma": config.min_snr_gamma or "",
        "ss_caption_dropout_rate": config.caption_dropout,
        "ss_shuffle_caption": str(config.shuffle_tags),
        "ss_keep_tokens": config.keep_tokens,
        "ss_flip_aug": str(config.random_flip),
        "ss_caption_extension": config.caption_extension,
        "ss_dataset_dirs": json.dumps({folder: {"n_repeats": 1, "img_count": len(dataset)}}),
        "ss_tag_frequency": json.dumps({folder: dataset.tag_frequency()}),
        "ss_datasets": json.dumps(
            [{"source": dataset.source, "num_images": len(dataset), "trigger_word": config.trigger_word}]
        ),
        "loraloom.trainer": "loraloom",
    }
    if "text_encoder_2" in text_encoder_lrs:
        meta["loraloom.text_encoder_2_lr"] = text_encoder_lrs["text_encoder_2"]
    if final_loss is not None:
        meta["loraloom.final_loss"] = f"{final_loss:.6g}"
    if config.trigger_word:
        meta["loraloom.trigger_words"] = json.dumps([config.trigger_word])
    meta.update(modelspec_metadata(config, base=base, resolution=resolution))
    return {key: str(value) for key, value in meta.items()}


# Stability's model spec (https://github.com/Stability-AI/ModelSpec), as kohya's sd-scripts write it
# for a LoRA (``library/sai_model_spec.py``).
MODELSPEC_VERSION = "1.0.0"
MODELSPEC_STABILITY_IMPL = "https://github.com/Stability-AI/generative-models"


def modelspec_metadata(config: TrainConfig, *, base: BaseModel, resolution: int) -> dict[str, str]:
    """``modelspec.*`` for a LoRA on ``base``: architecture, implementation, title, resolution,
    prediction type (and description, tags when given). No date: the same run writes the same bytes."""
    family = base.family
    v_prediction = _prediction_type(base) == "v_prediction"
    if family.name == "sdxl":
        architecture = "stable-diffusion-xl-v1-base"
    elif family.name == "sd2":
        architecture = "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
    else:
        architecture = "stable-diffusion-v1"
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": MODELSPEC_STABILITY_IMPL if family.name == "sdxl" else "diffusers",
        "modelspec.title": config.adapter_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }
    if config.description:
        spec["modelspec.description"] = config.description
    if config.tags:
        spec["modelspec.tags"] = ", ".join(config.tags)
    return spec


def _prediction_type(base: BaseModel) -> str:
    return str(getattr(base.pipeline.scheduler.config, "prediction_type", "epsilon"))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def build_adapter(
    modules: dict[str, LoraModule], metadata: dict[str, str], base: BaseModel
) -> ExportedAdapter:
    """Validate against the base, serialize, parse the bytes back and validate again."""
    adapter = LoraAdapter(modules=modules, metadata=metadata, base=base.base_ref)
    validate_against_base(adapter, base.module_shapes, base.base_ref)
    if base.family.name == "sdxl":  # kohya's SDXL names: what A1111, ComfyUI and diffusers load
        data = to_kohya(adapter, module_names=base.module_shapes.keys())
    else:
        data = save_canonical(adapter)
    reread = load_adapter(data, module_names=base.module_shapes.keys())
    validate_against_base(reread, base.module_shapes, base.base_ref)
    return ExportedAdapter(adapter=adapter, data=data, sha256=hashlib.sha256(data).hexdigest())


def write_file(data: bytes, path: str | Path) -> Path:
    """Write atomically: a reader never sees half a file."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
    return path
