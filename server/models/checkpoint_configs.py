"""The diffusers configs a single-file checkpoint is read with.

A file loraloom wrote carries its own (safetensors metadata ``loraloom.diffusers_config``).
Any other file is read with the published configs of its family (SD 1.5, SD 2.1 768-v or
512-base, SDXL base 1.0), shipped in the repo; its prediction type is told from the file
(``detect_prediction_type``) or given; its shapes are checked against those configs first, so a
file of another size fails with a message instead of deep inside diffusers.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from server.models import tokenizer as clip
from server.models.errors import BaseModelError
from server.models.families import SD2, SDXL, Family

CONFIG_METADATA_KEY = "loraloom.diffusers_config"
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")

V_PRED_MARKER = "v_pred"  # an empty tensor some v-prediction checkpoints carry (ComfyUI reads it)
MODELSPEC_PREDICTION = "modelspec.prediction_type"  # Stability's model spec metadata: "epsilon" | "v"
# ComfyUI's SD 2.x probe: this bias spreads wider in the 768-v model than in 512-base.
SD2_V_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_PROBE_STD = 0.09

_PADS: dict[str, dict[str, str]] = {
    "sd1": {"tokenizer": clip.EOS_TOKEN},
    "sd2": {"tokenizer": clip.OPEN_CLIP_PAD},
    "sdxl": {"tokenizer": clip.EOS_TOKEN, "tokenizer_2": clip.OPEN_CLIP_PAD},
}

# The weights whose sizes are checked against the configs a file without ours is read with.
_UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
_TOKEN_EMBEDDINGS: dict[str, dict[str, str]] = {
    "sd1": {"text_encoder": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"},
    "sd2": {"text_encoder": "cond_stage_model.model.token_embedding.weight"},
    "sdxl": {
        "text_encoder": "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "text_encoder_2": "conditioner.embedders.1.model.token_embedding.weight",
    },
}


def check_prediction_type(value: str) -> str:
    if value not in PREDICTION_TYPES:
        raise BaseModelError(f"prediction type {value!r}: choose one of {', '.join(PREDICTION_TYPES)}")
    return value


def shipped(family: Family, prediction_type: str) -> tuple[str, dict[str, Any]]:
    """(title, configs) of the published model of ``family`` (SD 2.x: the variant of that
    prediction type), with ``prediction_type`` in its scheduler."""
    if family is SDXL:
        from server.models.sdxl_configs import SDXL_CONFIGS

        title, configs = "SDXL base 1.0", SDXL_CONFIGS
    elif family is SD2:
        from server.models.sd2_configs import sd2_configs

        v = prediction_type == "v_prediction"
        title, configs = ("SD 2.1 768-v" if v else "SD 2.1 512-base"), sd2_configs(prediction_type)
    else:
        from server.models.sd15_configs import MODEL_INDEX, SD15_CONFIGS

        title, configs = "SD 1.5", {"model_index": MODEL_INDEX, **SD15_CONFIGS}
    configs = copy.deepcopy(configs)
    configs["scheduler"]["prediction_type"] = prediction_type
    return title, configs


def detect_prediction_type(handle, keys: list[str], family: Family, metadata: dict[str, str]) -> str:
    """What a file without our configs predicts: a ``v_pred`` marker or model-spec metadata
    when it has one; for SD 2.x ComfyUI's weight probe (768-v: v_prediction, 512-base: epsilon),
    else v_prediction as diffusers assumes; epsilon for SD 1.x and SDXL."""
    if V_PRED_MARKER in keys:
        return "v_prediction"
    spec = metadata.get(MODELSPEC_PREDICTION, "")
    if spec in ("v", "v_prediction", "epsilon"):
        return "epsilon" if spec == "epsilon" else "v_prediction"
    if family is not SD2:
        return "epsilon"
    if SD2_V_PROBE in keys:
        spread = handle.get_tensor(SD2_V_PROBE).float().std(unbiased=False).item()
        return "v_prediction" if spread > SD2_V_PROBE_STD else "epsilon"
    return "v_prediction"


def file_configs(handle, keys: list[str], family: Family, name: str, prediction_type: str) -> dict[str, Any]:
    """The configs to read an open safetensors file with: its own, or its family's published ones."""
    check_prediction_type(prediction_type)
    metadata = handle.metadata() or {}
    raw = metadata.get(CONFIG_METADATA_KEY)
    if raw:
        try:
            configs = json.loads(raw)
        except ValueError as error:
            raise BaseModelError(f"{name}: metadata {CONFIG_METADATA_KEY} is not JSON ({error})") from None
        if prediction_type != "auto":
            configs["scheduler"]["prediction_type"] = prediction_type
        return configs
    if prediction_type == "auto":
        prediction_type = detect_prediction_type(handle, keys, family, metadata)
    title, configs = shipped(family, prediction_type)
    checks = [(_UNET_CONV_IN, 0, configs["unet"]["block_out_channels"][0], "UNet width")]
    for encoder, key in _TOKEN_EMBEDDINGS[family.name].items():
        checks.append((key, 1, configs[encoder]["hidden_size"], f"{encoder} width"))
    for key, axis, expected, what in checks:
        got = handle.get_slice(key).get_shape()[axis] if key in keys else expected
        if got != expected:
            raise BaseModelError(
                f"{name} is a {family.title} checkpoint without loraloom's embedded configs, so it is "
                f"read as {title}, but its shapes differ ({what} {got}, {title} has {expected}). "
                "Load the model it came from as a diffusers folder, or write the file with loraloom's "
                "save_single_file, which embeds its configs."
            )
    return configs


def model_index(configs: dict[str, Any], family: Family) -> dict[str, Any]:
    """The pipeline's ``model_index.json``: the file's own, else the family's, naming the
    scheduler class the configs hold."""
    index = dict(configs.get("model_index") or shipped(family, "epsilon")[1]["model_index"])
    index["_class_name"] = family.pipeline_class
    scheduler = configs["scheduler"].get("_class_name")
    if scheduler:
        index["scheduler"] = ["diffusers", scheduler]
    return index


def tokenizer_pads(configs: dict[str, Any], family: Family) -> dict[str, str]:
    """Each tokenizer's pad token: the file's record, else the family's (OpenCLIP pads with "!")."""
    return {**_PADS[family.name], **configs.get("tokenizers", {})}
