"""Map the module names a file uses onto the base model's module keys.

Two mismatches are common in the wild. kohya / A1111 flatten module paths with
underscores (``lora_unet_down_blocks_0_attentions_0_proj_in``), which cannot be
undone without the base model's module names; kohya's SDXL files moreover use the
original Stability (SGM) UNet paths (``lora_unet_input_blocks_4_1_...``, see ``sgm``),
accepted as aliases of the base's diffusers names. And CLIP text-encoder paths carry a
``text_model.`` level in transformers 4 but not in transformers 5, so a text
encoder LoRA names ``text_encoder.text_model.encoder.layers.0...`` where the base
may have ``text_encoder.encoder.layers.0...``: both spellings are accepted.
"""

from __future__ import annotations

from collections.abc import Iterable

from adapters.canonical import COMPONENTS
from adapters.formats.sgm import sgm_aliases

TEXT_MODEL = "text_model."
TEXT_PROJECTION = "text_projection"

# kohya prefix -> component; ``lora_te_`` is SD 1.x/2.x, ``lora_te1_``/``lora_te2_`` SDXL.
KOHYA_PREFIXES: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}


def split_key(key: str) -> tuple[str, str]:
    component, _, path = key.partition(".")
    return component, path


def text_model_aliases(key: str) -> list[str]:
    """``key`` and its other spelling with / without ``text_model.`` (text encoders only)."""
    component, path = split_key(key)
    if not component.startswith("text_encoder"):
        return [key]
    if path.startswith(TEXT_MODEL):
        return [key, f"{component}.{path[len(TEXT_MODEL) :]}"]
    return [key, f"{component}.{TEXT_MODEL}{path}"]


def resolve_key(key: str, names: set[str] | None) -> str:
    """The base model's spelling of ``key`` when it has one, else ``key`` unchanged."""
    if not names or key in names:
        return key
    for alias in text_model_aliases(key):
        if alias in names:
            return alias
    return key


def kohya_lookup(names: Iterable[str]) -> dict[str, str]:
    """Flattened kohya module name (without prefix) per component -> module key.

    UNet modules answer to their diffusers path (kohya's SD 1.x/2.x files) and to their SGM
    path (kohya's SDXL files); the two never flatten to the same name.
    """
    names = list(names)
    table: dict[str, str] = {}
    for key in names:
        component = split_key(key)[0]
        if component not in COMPONENTS:
            continue
        for alias in text_model_aliases(key):
            flat = split_key(alias)[1].replace(".", "_")
            table.setdefault(f"{component}:{flat}", key)
    for sgm, key in sgm_aliases(names).items():
        table.setdefault(f"unet:{sgm.replace('.', '_')}", key)
    return table


def kohya_prefix(component: str, sdxl_text_encoders: bool) -> str:
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder_2":
        return "lora_te2_"
    return "lora_te1_" if sdxl_text_encoders else "lora_te_"


def kohya_flat_path(key: str) -> str:
    """The flattened kohya name of a module key (text encoders get ``text_model_``, as A1111 expects;
    SDXL's ``text_projection`` sits beside ``text_model``, not in it: ``lora_te2_text_projection``)."""
    component, path = split_key(key)
    if component.startswith("text_encoder") and not path.startswith((TEXT_MODEL, TEXT_PROJECTION)):
        path = TEXT_MODEL + path
    return path.replace(".", "_")
