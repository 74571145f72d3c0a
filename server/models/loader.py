"""The one place that loads a base model; the server and the trainer both call it.

A source is the name of a built-in model (``micro``, ``tiny``, ``small``,
``tiny-sdxl``, ``tiny-sd2``: built from a seed by the factory; ``toy``: trained
weights shipped in ``data/toy``), a diffusers folder (SD 1.x, SD 2.x or SDXL), or a
single-file ``.safetensors`` checkpoint in the original LDM/SGM layout. Only
safetensors weights are read: pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``)
are refused, never unpickled. The model's family (``server.models.families``)
decides its pipeline, its components and its conditioning.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from adapters.canonical import BaseModelRef, ModuleShapes
from server.models import factory
from server.models.checkpoint_configs import check_prediction_type
from server.models.errors import BaseModelError
from server.models.families import FAMILIES, Family, family_of
from server.models.fingerprint import files_key, remembered
from server.models.noise import no_loading_bars, quiet_library_noise
from server.models.shapes import module_shapes

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")

CONVERT_HINT = (
    "loraloom reads only .safetensors weights, because loading a pickle can run arbitrary code. "
    "Convert it once, offline, on a machine you trust, e.g. "
    '`python -c "import torch, safetensors.torch as st; '
    "sd = torch.load('model.ckpt', weights_only=True); sd = sd.get('state_dict', sd); "
    "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\"` "
    "(for a diffusers folder: `pipe.save_pretrained(folder, safe_serialization=True)`)."
)


@dataclass
class BaseModel:
    """A loaded base model and what the rest of loraloom needs to know about it."""

    pipeline: Any
    source: str
    name: str
    architecture: str
    resolution: int
    device: torch.device
    dtype: torch.dtype
    load_seconds: float = field(default=0.0)
    # Names the files the weights came from (``server.models.fingerprint.files_key``): the
    # fingerprint is then computed once per files and read back from the cache on a restart.
    files_key: str | None = None

    @property
    def family(self) -> Family:
        return family_of(self.pipeline)

    @cached_property
    def module_shapes(self) -> ModuleShapes:
        return module_shapes(self.pipeline)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over every weight (names, shapes, float32 values): names the exact base."""
        return remembered(self.files_key, self._hash_weights)

    def _hash_weights(self) -> str:
        digest = hashlib.sha256()
        for component in self.family.weight_components:
            model = getattr(self.pipeline, component)
            for key, tensor in sorted(model.state_dict().items()):
                digest.update(f"{component}.{key}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    @property
    def base_ref(self) -> BaseModelRef:
        return BaseModelRef(architecture=self.architecture, fingerprint=self.fingerprint)


# Built-in names that are trained weights shipped in the repo, not seeded factory builds.
BUILTIN_FOLDERS: dict[str, Path] = {"toy": Path(__file__).parent / "data" / "toy"}


def builtin_models() -> tuple[str, ...]:
    return tuple(dict.fromkeys((*factory.SPECS, *BUILTIN_FOLDERS)))


def load_base_model(
    source: str | Path = "tiny",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prediction_type: str = "auto",
) -> BaseModel:
    """Load ``source`` (a built-in name, a diffusers folder or a single-file checkpoint).

    ``prediction_type`` (epsilon, v_prediction) overrides what the model's scheduler predicts;
    auto keeps the model's own (a single file without configs: told from the file).
    On CUDA in float16, a VAE that overflows in float16 (``force_upcast``: SDXL's) is kept in float32.
    """
    check_prediction_type(prediction_type)
    quiet_library_noise()
    started = time.perf_counter()
    text = str(source)
    key = None
    if text in BUILTIN_FOLDERS:
        pipeline = _load_path(BUILTIN_FOLDERS[text], dtype, prediction_type)
        name = text
    elif text in factory.SPECS:
        pipeline = factory.build_pipeline(text, seed=0, dtype=dtype)
        name = text
    else:
        path = Path(text).expanduser()
        name = path.stem if path.is_file() else path.name
        pipeline = _load_path(path, dtype, prediction_type)
        key = files_key(path, dtype)
    _set_prediction_type(pipeline, prediction_type)
    pipeline = pipeline.to(device)
    family = family_of(pipeline)
    _align_weights(pipeline, family)
    if dtype == torch.float16 and getattr(pipeline.vae.config, "force_upcast", False):
        pipeline.vae.to(dtype=torch.float32)
    for component in family.weight_components:
        getattr(pipeline, component).requires_grad_(False).eval()
    model = BaseModel(
        pipeline=pipeline,
        source=text,
        name=name,
        architecture=infer_architecture(pipeline),
        resolution=pipeline.unet.config.sample_size * pipeline.vae_scale_factor,
        device=torch.device(device),
        dtype=dtype,
        load_seconds=time.perf_counter() - started,
        files_key=key,
    )
    log.info(
        "loaded base model %s (%s, %s, %d px) on %s in %.2fs",
        model.name,
        family.title,
        model.architecture,
        model.resolution,
        model.device,
        model.load_seconds,
    )
    return model


def _set_prediction_type(pipeline, prediction_type: str) -> None:
    scheduler = pipeline.scheduler
    if prediction_type != "auto" and scheduler.config.get("prediction_type") != prediction_type:
        pipeline.scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)


def _load_path(path: Path, dtype: torch.dtype, prediction_type: str = "auto"):
    if not path.exists():
        raise BaseModelError(
            f"base model {str(path)!r} not found: give a diffusers folder, a single-file .safetensors "
            "checkpoint (SD 1.x, SD 2.x or SDXL), "
            f"or a built-in model ({', '.join(builtin_models())})"
        )
    if path.is_dir():
        return _load_folder(path, dtype)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise BaseModelError(f"refusing pickle checkpoint {path.name}. {CONVERT_HINT}")
    if path.suffix.lower() != ".safetensors":
        raise BaseModelError(
            f"{path.name} is not a model loraloom can read: expected a diffusers folder "
            "or a single-file .safetensors checkpoint (SD 1.x, SD 2.x or SDXL)"
        )
    from server.models.single_file import load_single_file

    _refuse_pickle_bytes(path)
    try:
        return load_single_file(path, dtype=dtype, prediction_type=prediction_type)
    except BaseModelError:
        raise
    except Exception as error:  # diffusers raises many types for a file it cannot map
        raise BaseModelError(
            f"{path.name} is not a loadable SD 1.x, SD 2.x or SDXL checkpoint ({error}). "
            "Check that the file is complete, or convert it to a diffusers folder."
        ) from error


def _refuse_pickle_bytes(path: Path) -> None:
    """A pickle or a torch zip archive renamed ``.safetensors`` is refused before any parsing.

    A safetensors file starts with its JSON header's length (8 bytes, little-endian) and the
    header's ``{``; that length's first byte may well be 0x80, so the header is recognised first.
    """
    with path.open("rb") as handle:
        head = handle.read(9)
    header_length = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and 8 + header_length <= path.stat().st_size:
        return
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise BaseModelError(f"{path.name} is a pickle/zip archive named .safetensors. {CONVERT_HINT}")


def _load_folder(path: Path, dtype: torch.dtype):
    if not (path / "model_index.json").is_file():
        raise BaseModelError(
            f"{path} is not a diffusers folder: model_index.json is missing "
            "(save one with `pipeline.save_pretrained(folder)`)"
        )
    family = folder_family(path)
    missing = [name for name in family.required_components if not (path / name).is_dir()]
    if missing:
        raise BaseModelError(
            f"diffusers folder {path} ({family.title}) is incomplete: missing {', '.join(missing)}/"
        )
    for component in family.weight_components:
        folder = path / component
        if any(folder.glob("*.safetensors")):
            continue
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            listed = ", ".join(pickles)
            raise BaseModelError(f"{component}/ holds only pickle weights ({listed}). {CONVERT_HINT}")
        raise BaseModelError(f"diffusers folder {path} is incomplete: no weights in {component}/")
    extra: dict[str, Any] = {}
    if family.pipeline_class == "StableDiffusionPipeline":
        extra = {"safety_checker": None, "requires_safety_checker": False}
    with no_loading_bars():
        pipeline = family.pipeline_type().from_pretrained(
            str(path),
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            **extra,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _align_weights(pipeline, family: Family) -> None:
    """Copy weights a loader left at their offsets in the file's memory map to aligned memory.

    transformers keeps some safetensors tensors in place, not on 64-byte boundaries, and CPU
    matmuls round differently there: equal weights gave images ~1e-6 apart by load path.
    """
    for component in family.weight_components:
        module = getattr(pipeline, component)
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()


def folder_family(path: Path) -> Family:
    """The family a diffusers folder declares: its ``model_index.json`` pipeline class, and for
    SD 1.x vs 2.x its UNet's cross-attention width."""
    import json

    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as error:
        raise BaseModelError(f"{path}/model_index.json is not readable JSON ({error})") from None
    kind = str(index.get("_class_name", "")) if isinstance(index, dict) else ""
    if "XL" in kind:
        if index.get("text_encoder") in (None, [None, None]):
            raise BaseModelError(f"{path} is an SDXL refiner ({kind}); serve an SDXL base model")
        return FAMILIES["sdxl"]
    if kind and kind not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise BaseModelError(
            f"{path} is a {kind} folder; loraloom serves Stable Diffusion 1.x, 2.x and SDXL text-to-image "
            "pipelines (StableDiffusionPipeline, StableDiffusionXLPipeline)"
        )
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return FAMILIES["sd1"]
    width = unet.get("cross_attention_dim")
    return FAMILIES["sd2"] if width == 1024 or unet.get("use_linear_projection") else FAMILIES["sd1"]


def infer_architecture(pipeline) -> str:
    """``sd_v1`` / ``sd_v2`` / ``sdxl`` for real checkpoints, ``loraloom:<size>`` for ours."""
    family = family_of(pipeline)
    config = pipeline.unet.config
    channels = tuple(config.block_out_channels)
    for spec in factory.SPECS.values():
        if (
            spec.family == family.name
            and channels == spec.unet_channels
            and config.layers_per_block == spec.unet_layers_per_block
            and config.cross_attention_dim == spec.text_hidden + spec.text2_hidden
            and pipeline.text_encoder.config.num_hidden_layers == spec.text_layers
        ):
            return f"loraloom:{spec.name}"
    return family.architecture
