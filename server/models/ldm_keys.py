"""diffusers weight names -> the original LDM / SGM names (what A1111 and ComfyUI files use).

The UNet and VAE mappings are derived from their configs, so they fit any SD-shaped topology
(the factory's tiny models included), not only the 4-level SD layout; SDXL's added conditioning
(``add_embedding``) is SGM's ``label_emb.0``. ``open_clip_state_dict`` writes a CLIP text model
in OpenCLIP's layout (SD 2.x's encoder, SDXL's second): fused ``attn.in_proj_*``, ``ln_final``,
a transposed ``text_projection``. diffusers' single-file converter is the inverse of all three.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

_RESNET_TO_LDM = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)

_UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's text_time embedding (SGM's label_emb)
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


def unet_key(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (under ``model.diffusion_model.``) of one diffusers UNet weight."""
    layers = config["layers_per_block"]
    for prefix, ldm in _UNET_FIXED.items():
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


def vae_key(key: str, blocks: int) -> str:
    """The LDM name (under ``first_stage_model.``) of one diffusers VAE weight."""
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


def unet_state_dict(unet) -> dict[str, torch.Tensor]:
    config = dict(unet.config)
    return {"model.diffusion_model." + unet_key(k, config): v for k, v in unet.state_dict().items()}


def vae_state_dict(vae) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.block_out_channels)
    state: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        ldm_key = vae_key(key, blocks)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.dim() == 2:
            value = value.reshape(*value.shape, 1, 1)  # LDM's attention uses 1x1 convs
        state["first_stage_model." + ldm_key] = value
    return state


def clip_state_dict(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text model in transformers' layout under ``prefix`` (always with ``text_model.``:
    transformers >= 5.6 flattens ``CLIPTextModel``, the LDM/SGM layout keeps the level)."""
    level = "" if hasattr(text_encoder, "text_model") else "text_model."
    return {prefix + level + key: value for key, value in text_encoder.state_dict().items()}


_OPEN_CLIP_LAYER = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("self_attn.out_proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)


def open_clip_state_dict(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text model (with or without projection) in OpenCLIP's layout under ``prefix``."""
    state = {key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()}
    state.pop("embeddings.position_ids", None)  # a buffer, not a weight
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:  # OpenCLIP multiplies x @ P; a Linear holds P.T
        out["text_projection"] = state.pop("text_projection.weight").T
    for index in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{index}.", f"transformer.resblocks.{index}."
        for kind in ("weight", "bias"):
            fused = [state.pop(f"{layer}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(fused)
        for key in [key for key in state if key.startswith(layer)]:
            name = key[len(layer) :]
            for ours, theirs in _OPEN_CLIP_LAYER:
                if name.startswith(ours):
                    out[block + theirs + name[len(ours) :]] = state.pop(key)
    if state:
        raise ValueError(f"no OpenCLIP name for text encoder weights {sorted(state)}")
    return {prefix + key: value for key, value in out.items()}
