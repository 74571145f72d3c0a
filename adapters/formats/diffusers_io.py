"""diffusers LoRA files (``pytorch_lora_weights.safetensors``).

Read: the PEFT-style layout diffusers writes since 0.22 (``unet.<module>.lora_A.weight``
/ ``lora_B.weight``, alpha and ranks from the ``lora_adapter_metadata`` JSON or
``<module>.alpha`` tensors, else alpha = rank), and the older layouts
``<module>.lora.down/up.weight``, ``<attn>.processor.to_q_lora.down/up.weight``,
``<text attn>.self_attn.to_q_lora.down/up.weight`` and ``<module>.lora_linear_layer.down/up.weight``
(what diffusers' own kohya conversion produces, SDXL's ``text_encoder_2`` included).

Write: the PEFT-style layout with ``lora_adapter_metadata`` carrying each
component's ``r``/``lora_alpha`` and per-module ``rank_pattern``/``alpha_pattern``,
which ``pipe.load_lora_weights`` turns into a ``LoraConfig``.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
from collections import Counter
from collections.abc import Mapping

import torch

from adapters.canonical import COMPONENTS, LoraAdapter
from adapters.errors import AdapterInvalid, InvalidArgument
from adapters.formats.common import CONVERT_ADVICE, PendingModule, collect, match_pattern
from adapters.formats.names import TEXT_MODEL, resolve_key, split_key
from adapters.safeparse import write_safetensors

METADATA_KEY = "lora_adapter_metadata"

NEW_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".alpha": "alpha"}
OLD_SUFFIXES = {
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down",
    "_lora.up.weight": "up",
}
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")
# The old text-encoder layout names CLIP's attention projections as the UNet's (``to_q_lora``).
_TEXT_ATTENTION = re.compile(r"\.self_attn\.to_(q|k|v|out)$")


def is_diffusers_key(key: str) -> bool:
    return key.split(".", 1)[0] in COMPONENTS and (
        any(key.endswith(s) for s in NEW_SUFFIXES if s != ".alpha")
        or any(key.endswith(s) for s in OLD_SUFFIXES)
    )


def _module_of(stem: str) -> str:
    """``...attn1.processor.to_out`` (the old attention-processor layout) -> ``...attn1.to_out.0``;
    a text encoder's ``...self_attn.to_out`` (its old layout) -> ``...self_attn.out_proj``."""
    if stem.startswith("text_encoder") and (match := _TEXT_ATTENTION.search(stem)):
        return f"{stem[: match.start()]}.self_attn.{match.group(1)}_proj"
    match = _PROCESSOR.search(stem)
    if match is None:
        return stem
    target = match.group(1)
    return stem[: match.start()] + "." + ("to_out.0" if target == "to_out" else target)


def read(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], names: set[str] | None
) -> dict[str, PendingModule]:
    suffixes = {**NEW_SUFFIXES, **OLD_SUFFIXES}

    def parse(key: str) -> tuple[str, str] | None:
        if key.split(".", 1)[0] not in COMPONENTS:
            return None
        for suffix, role in suffixes.items():
            if key.endswith(suffix):
                return resolve_key(_module_of(key[: -len(suffix)]), names), role
        return None

    pending = collect(tensors, parse, "diffusers")
    configs = _component_configs(metadata)
    for key, item in pending.items():
        if item.alpha is not None or item.down is None:
            continue
        component, path = split_key(key)
        config = configs.get(component)
        if config is not None:
            item.alpha = peft_alpha(config, path, int(item.down.shape[0]))
    return pending


def _component_configs(metadata: Mapping[str, str]) -> dict[str, dict]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise AdapterInvalid(f"the {METADATA_KEY} metadata is not valid JSON") from None
    if not isinstance(flat, dict):
        raise AdapterInvalid(f"the {METADATA_KEY} metadata is not a JSON object")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = str(key).partition(".")
        configs.setdefault(component, {})[field] = value
    for component, config in configs.items():
        check_peft_config(config, f"{METADATA_KEY} ({component})")
    return configs


def check_peft_config(config: Mapping, where: str) -> None:
    """Refuse PEFT configs that are not plain LoRA."""
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise AdapterInvalid(
            f"{where} says peft_type {peft_type}; loraloom reads PEFT/diffusers files of plain LoRA only "
            f"(LoHa, LoKr and DoRA in LyCORIS' kohya-style files). {CONVERT_ADVICE}"
        )
    if config.get("use_dora"):
        raise AdapterInvalid(
            f"{where} is PEFT's DoRA (use_dora); loraloom applies DoRA from LyCORIS' kohya-style files "
            f"(dora_scale) only. {CONVERT_ADVICE}"
        )
    if config.get("fan_in_fan_out"):
        raise AdapterInvalid(f"{where} sets fan_in_fan_out, which no Stable Diffusion layer uses")
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
        ):
            raise AdapterInvalid(f"{where}: {field} must be a number, is {value!r:.40}")


def peft_alpha(config: Mapping, path: str, rank: int) -> float:
    """The canonical alpha (scale * rank) of one module under a PEFT ``LoraConfig``."""
    alpha = match_pattern(config.get("alpha_pattern"), path)
    if alpha is None:
        alpha = config.get("lora_alpha", config.get("r", rank))
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterInvalid(f"alpha of module {path!r} must be a number, is {alpha!r:.40}")
    if config.get("use_rslora"):
        return float(alpha) * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r)
    return float(alpha)


def installed_clip_is_flat() -> bool:
    """Whether the installed transformers has the flattened ``CLIPTextModel`` (>= 5.6; no ``text_model.``).

    Read from the package version, without importing transformers.
    """
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return False
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]] + [0, 0]
    return (parts[0], parts[1]) >= (5, 6)


def _diffusers_key(key: str, flat_text_encoder: bool) -> str:
    """Only ``text_encoder`` (a ``CLIPTextModel``) loses ``text_model.``: SDXL's ``text_encoder_2``
    is a ``CLIPTextModelWithProjection``, which keeps its ``text_model`` (beside ``text_projection``)
    in every transformers version, and diffusers looks its names up verbatim."""
    component, path = split_key(key)
    if flat_text_encoder and component == "text_encoder" and path.startswith(TEXT_MODEL):
        return f"{component}.{path[len(TEXT_MODEL) :]}"
    return key


def to_diffusers(adapter: LoraAdapter, *, flat_text_encoder: bool | None = None) -> bytes:
    """Safetensors that ``StableDiffusionPipeline.load_lora_weights`` loads as this adapter.

    diffusers names text-encoder modules as the installed transformers does, and
    transformers >= 5.6 dropped the ``text_model.`` level of ``CLIPTextModel``;
    ``flat_text_encoder`` (default: follow the installed transformers) writes ``text_encoder``'s
    modules without it. SDXL's ``text_encoder_2`` keeps it either way (``_diffusers_key``).
    """
    if not adapter.is_low_rank:
        raise InvalidArgument(
            f"diffusers' LoRA format holds plain LoRA/LoCon only and this adapter is {adapter.kind}; "
            "write it with to_kohya (LyCORIS' names, which A1111 and ComfyUI read) or save_canonical"
        )
    if flat_text_encoder is None:
        flat_text_encoder = installed_clip_is_flat()
    tensors: dict[str, torch.Tensor] = {}
    per_component: dict[str, dict[str, tuple[int, float]]] = {}
    for canonical_key, module in adapter.modules.items():
        key = _diffusers_key(canonical_key, flat_text_encoder)
        tensors[f"{key}.lora_A.weight"] = module.down.contiguous()
        tensors[f"{key}.lora_B.weight"] = module.up.contiguous()
        component, path = split_key(key)
        per_component.setdefault(component, {})[path] = (module.rank, float(module.alpha))
    adapter_metadata: dict[str, object] = {}
    for component, modules in per_component.items():
        rank = Counter(r for r, _ in modules.values()).most_common(1)[0][0]
        alpha = Counter(a for _, a in modules.values()).most_common(1)[0][0]
        config = {
            "r": rank,
            "lora_alpha": alpha,
            "rank_pattern": {p: r for p, (r, _) in modules.items() if r != rank},
            "alpha_pattern": {p: a for p, (_, a) in modules.items() if a != alpha},
            "target_modules": sorted(modules),
            "peft_type": "LORA",
            "init_lora_weights": True,
        }
        adapter_metadata.update({f"{component}.{k}": v for k, v in config.items()})
    metadata = {k: v for k, v in adapter.metadata.items() if not k.startswith("loraloom.format")}
    metadata["format"] = "pt"
    metadata[METADATA_KEY] = json.dumps(adapter_metadata, sort_keys=True)
    return write_safetensors(tensors, metadata)
