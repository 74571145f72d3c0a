"""Single-file SD 1.x checkpoints (the original LDM layout, as A1111 and ComfyUI use).

Reading goes through diffusers' own converter (``from_single_file``) with a
local config folder, so nothing is fetched from a hub: files we wrote carry
their diffusers configs in the safetensors metadata; any other file is read as
SD 1.5 with the configs shipped here. Writing is the inverse mapping, derived
from the UNet and VAE configs so it works for any SD-1.x-shaped topology (the
factory's tiny models included), not just the 4-block SD layout.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from server.models import tokenizer as clip
from server.models.noise import no_loading_bars

CONFIG_METADATA_KEY = "loraloom.diffusers_config"

_RESNET_TO_LDM = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def _rename_unet_key(key: str, config: dict) -> str:
    layers = config["layers_per_block"]
    fixed = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    for prefix, ldm in fixed.items():
        if key.startswith(prefix):
            return ldm + key[len(prefix) :]
    parts = key.split(".")
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        slot = 1 if kind == "attentions" else 2 * index
        return ".".join(["middle_block", str(slot), *_resnet_rest(kind, rest)])
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.weight
            return ".".join(["input_blocks", str((block + 1) * (layers + 1)), "0", "op", *parts[5:]])
        index, rest = int(parts[3]), parts[4:]
        slot = "1" if kind == "attentions" else "0"
        ldm_index = 1 + block * (layers + 1) + index
        return ".".join(["input_blocks", str(ldm_index), slot, *_resnet_rest(kind, rest)])
    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":  # up_blocks.i.upsamplers.0.conv.weight
            has_attention = "CrossAttn" in config["up_block_types"][block]
            slot = "2" if has_attention else "1"
            ldm_index = block * (layers + 1) + layers
            return ".".join(["output_blocks", str(ldm_index), slot, *parts[4:]])
        index, rest = int(parts[3]), parts[4:]
        slot = "1" if kind == "attentions" else "0"
        ldm_index = block * (layers + 1) + index
        return ".".join(["output_blocks", str(ldm_index), slot, *_resnet_rest(kind, rest)])
    raise ValueError(f"unexpected UNet weight {key!r}")


def _resnet_rest(kind: str, rest: list[str]) -> list[str]:
    if kind != "resnets":
        return rest
    name = ".".join(rest)
    for diffusers_name, ldm_name in _RESNET_TO_LDM:
        if name.startswith(diffusers_name + "."):
            return (ldm_name + name[len(diffusers_name) :]).split(".")
    return rest


_VAE_ATTENTION_TO_LDM = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def _rename_vae_key(key: str, blocks: int) -> str:
    parts = key.split(".")
    side = parts[0]  # encoder / decoder / quant_conv / post_quant_conv
    if side not in ("encoder", "decoder"):
        return key
    body = parts[1:]
    if body[0] == "conv_norm_out":
        return ".".join([side, "norm_out", *body[1:]])
    if body[0] == "mid_block":
        if body[1] == "resnets":
            rest = ".".join(body[3:]).replace("conv_shortcut", "nin_shortcut")
            return f"{side}.mid.block_{int(body[2]) + 1}.{rest}"
        rest = ".".join(body[3:]) + "."
        for diffusers_name, ldm_name in _VAE_ATTENTION_TO_LDM:
            if rest.startswith(diffusers_name):
                rest = ldm_name + rest[len(diffusers_name) :]
        return f"{side}.mid.attn_1.{rest.rstrip('.')}"
    if body[0] in ("down_blocks", "up_blocks"):
        block = int(body[1])
        ldm_block = block if side == "encoder" else blocks - 1 - block
        group = "down" if side == "encoder" else "up"
        if body[2] == "resnets":
            rest = ".".join(body[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{side}.{group}.{ldm_block}.block.{body[3]}.{rest}"
        sampler = "downsample" if body[2] == "downsamplers" else "upsample"
        return f"{side}.{group}.{ldm_block}.{sampler}.{'.'.join(body[4:])}"
    return key


def to_ldm_state_dict(pipeline) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder weights in the original SD 1.x layout."""
    state: dict[str, torch.Tensor] = {}
    unet_config = dict(pipeline.unet.config)
    for key, value in pipeline.unet.state_dict().items():
        state["model.diffusion_model." + _rename_unet_key(key, unet_config)] = value
    blocks = len(pipeline.vae.config.block_out_channels)
    for key, value in pipeline.vae.state_dict().items():
        ldm_key = _rename_vae_key(key, blocks)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.dim() == 2:
            value = value.reshape(*value.shape, 1, 1)  # LDM's attention uses 1x1 convs
        state["first_stage_model." + ldm_key] = value
    # transformers >= 5.6 flattens CLIPTextModel; the LDM layout keeps the ``text_model.`` level.
    text_prefix = "" if hasattr(pipeline.text_encoder, "text_model") else "text_model."
    for key, value in pipeline.text_encoder.state_dict().items():
        state["cond_stage_model.transformer." + text_prefix + key] = value
    return {key: value.detach().contiguous() for key, value in state.items()}


def pipeline_configs(pipeline) -> dict[str, dict]:
    return {
        "unet": dict(pipeline.unet.config),
        "vae": dict(pipeline.vae.config),
        "text_encoder": pipeline.text_encoder.config.to_dict(),
        "scheduler": dict(pipeline.scheduler.config),
    }


def save_single_file(pipeline, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``pipeline`` as one SD 1.x ``.safetensors`` checkpoint with its configs embedded."""
    from safetensors.torch import save_file

    path = Path(path)
    state = to_ldm_state_dict(pipeline)
    if dtype is not None:
        state = {key: value.to(dtype) for key, value in state.items()}
    metadata = {CONFIG_METADATA_KEY: json.dumps(pipeline_configs(pipeline), default=_json_default)}
    save_file(state, str(path), metadata=metadata)
    return path


def _json_default(value):
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_config_folder(configs: dict[str, dict], folder: Path) -> Path:
    """A diffusers folder without weights: what ``from_single_file(config=...)`` reads offline."""
    from server.models.sd15_configs import MODEL_INDEX

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    names = {"scheduler": "scheduler_config.json"}
    for component, config in configs.items():
        (folder / component).mkdir(exist_ok=True)
        (folder / component / names.get(component, "config.json")).write_text(
            json.dumps(config, indent=2, default=_json_default)
        )
    clip.write_tokenizer_files(folder / "tokenizer")
    return folder


def embedded_configs(path: Path) -> dict[str, dict] | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    raw = metadata.get(CONFIG_METADATA_KEY)
    return json.loads(raw) if raw else None


def load_single_file(path: Path, *, dtype: torch.dtype = torch.float32):
    """Load an SD 1.x single-file checkpoint into a ``StableDiffusionPipeline``, offline."""
    from diffusers import StableDiffusionPipeline

    from server.models.sd15_configs import SD15_CONFIGS

    configs = embedded_configs(path) or SD15_CONFIGS
    with tempfile.TemporaryDirectory(prefix="loraloom-config-") as tmp, no_loading_bars():
        folder = write_config_folder(configs, Path(tmp))
        pipeline = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(folder),
            local_files_only=True,
            torch_dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
