"""Single-file checkpoints of SD 1.x, SD 2.x and SDXL, in the layout A1111 and ComfyUI use.

Writing (``save_single_file``): the UNet under ``model.diffusion_model.`` and the VAE under
``first_stage_model.`` (LDM names; SDXL's added conditioning as ``label_emb.0``); the text
encoders as each family's original stores them: SD 1.x ``cond_stage_model.transformer.``
(transformers' CLIP names), SD 2.x ``cond_stage_model.model.`` (OpenCLIP), SDXL
``conditioner.embedders.0.transformer.`` (CLIP) and ``conditioner.embedders.1.model.`` (OpenCLIP).
The diffusers configs go into the safetensors metadata, so the file reloads exactly.

Reading (``load_single_file``) goes through diffusers' own converter (``from_single_file``)
with a local config folder, so nothing is fetched from a hub. The family is told by the keys
(``checkpoint_family``); a file without our metadata is read with the published configs of
its family (``checkpoint_configs``), which only fit real-size checkpoints.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from server.models import checkpoint_configs
from server.models import ldm_keys as ldm
from server.models import tokenizer as clip
from server.models.checkpoint_configs import CONFIG_METADATA_KEY
from server.models.errors import BaseModelError
from server.models.families import SD1, SD2, SDXL, Family, family_of
from server.models.noise import no_loading_bars

SDXL_OPEN_CLIP = "conditioner.embedders.1.model."
_SDXL_CLIP_POSITIONS = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"


def checkpoint_family(keys: Iterable[str]) -> Family:
    """The family of a checkpoint from its weight names: SGM's second embedder means SDXL, an
    OpenCLIP ``cond_stage_model.model`` SD 2.x, anything else SD 1.x."""
    keys = list(keys)
    if any(key.startswith("conditioner.embedders.1.") for key in keys):
        return SDXL
    if any(key.startswith("conditioner.embedders.0.model.") for key in keys):
        raise BaseModelError(
            "this checkpoint has one OpenCLIP embedder in SGM layout: an SDXL refiner (or an SD 2.x "
            "model saved the SGM way), which loraloom does not read; give an SDXL base checkpoint, "
            "or save the model as a diffusers folder"
        )
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        return SD2
    return SD1


def to_ldm_state_dict(pipeline) -> dict[str, torch.Tensor]:
    """The pipeline's weights in its family's original single-file layout (LDM / SGM)."""
    family = family_of(pipeline)
    state = {**ldm.unet_state_dict(pipeline.unet), **ldm.vae_state_dict(pipeline.vae)}
    if family is SDXL:
        state.update(ldm.clip_state_dict(pipeline.text_encoder, "conditioner.embedders.0.transformer."))
        state.update(ldm.open_clip_state_dict(pipeline.text_encoder_2, SDXL_OPEN_CLIP))
    elif family is SD2:
        state.update(ldm.open_clip_state_dict(pipeline.text_encoder, "cond_stage_model.model."))
    else:
        state.update(ldm.clip_state_dict(pipeline.text_encoder, "cond_stage_model.transformer."))
    return {key: value.detach().contiguous() for key, value in state.items()}


def pipeline_configs(pipeline) -> dict[str, Any]:
    """Everything ``from_single_file`` needs besides the weights: the pipeline's own configs."""
    family = family_of(pipeline)
    configs: dict[str, Any] = {
        "model_index": {key: value for key, value in pipeline.config.items() if not key.startswith("_")},
        "unet": dict(pipeline.unet.config),
        "vae": dict(pipeline.vae.config),
        "scheduler": dict(pipeline.scheduler.config),
        "tokenizers": {name: getattr(pipeline, name).pad_token for name in family.tokenizers},
    }
    for name in family.text_encoders:
        configs[name] = getattr(pipeline, name).config.to_dict()
    return configs


def save_single_file(pipeline, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``pipeline`` as one ``.safetensors`` checkpoint (LDM/SGM layout), configs embedded."""
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


def write_config_folder(configs: dict[str, Any], family: Family, folder: Path) -> Path:
    """A diffusers folder without weights: what ``from_single_file(config=...)`` reads offline."""
    folder.mkdir(parents=True, exist_ok=True)
    index = checkpoint_configs.model_index(configs, family)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, default=_json_default))
    for component in ("unet", "vae", *family.text_encoders, "scheduler"):
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        text = json.dumps(configs[component], indent=2, default=_json_default)
        (folder / component).mkdir(exist_ok=True)
        (folder / component / name).write_text(text)
    pads = checkpoint_configs.tokenizer_pads(configs, family)
    for tokenizer in family.tokenizers:
        clip.write_tokenizer_files(folder / tokenizer, pad_token=pads[tokenizer])
    return folder


def load_single_file(path: Path, *, dtype: torch.dtype = torch.float32, prediction_type: str = "auto"):
    """Load a single-file SD 1.x / SD 2.x / SDXL checkpoint into its diffusers pipeline, offline.

    ``prediction_type`` (auto, epsilon, v_prediction) matters for files without our configs:
    auto tells it from the checkpoint (``checkpoint_configs.detect_prediction_type``).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        family = checkpoint_family(keys)
        configs = checkpoint_configs.file_configs(handle, keys, family, path.name, prediction_type)
        encoder_2 = None
        if family is SDXL and _encoders_look_alike(handle, keys):
            encoder_2 = {key: handle.get_tensor(key) for key in keys if key.startswith(SDXL_OPEN_CLIP)}
    extra: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    with tempfile.TemporaryDirectory(prefix="loraloom-config-") as tmp, no_loading_bars():
        folder = write_config_folder(configs, family, Path(tmp))
        if family is SDXL:
            extra = {"add_watermarker": False}
            if encoder_2 is not None:
                extra["text_encoder_2"] = _open_clip_encoder(encoder_2, folder, dtype)
        pipeline = family.pipeline_type().from_single_file(
            str(path), config=str(folder), local_files_only=True, torch_dtype=dtype, **extra
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _encoders_look_alike(handle, keys: list[str]) -> bool:
    """Whether SDXL's two encoders have one width: then diffusers would read encoder 1's CLIP
    weights as encoder 2 (it tells them apart by width), so encoder 2 is read on its own."""
    second = SDXL_OPEN_CLIP + "positional_embedding"
    if _SDXL_CLIP_POSITIONS not in keys or second not in keys:
        return False
    widths = {handle.get_slice(key).get_shape()[-1] for key in (_SDXL_CLIP_POSITIONS, second)}
    return len(widths) == 1


def _open_clip_encoder(state: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype):
    """SDXL's second encoder through diffusers' own OpenCLIP converter, from its weights alone."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModelWithProjection

    return create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection,
        checkpoint=state,
        subfolder="text_encoder_2",
        config=str(folder),
        torch_dtype=dtype,
        local_files_only=True,
    )
