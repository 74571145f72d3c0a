"""PEFT adapters: ``adapter_model.safetensors`` + ``adapter_config.json``.

Keys are ``[base_model.model.]<module path>.lora_A.weight`` / ``lora_B.weight``
relative to one model (a UNet or a text encoder), so the component is found
from the base model's module names when given, else from the path's shape.
Alpha and ranks come from the config (``lora_alpha``, ``alpha_pattern``,
``use_rslora``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from adapters.errors import AdapterInvalid, InvalidArgument
from adapters.formats.common import PendingModule, collect
from adapters.formats.diffusers_io import check_peft_config, peft_alpha
from adapters.formats.names import resolve_key

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1024 * 1024
PREFIX = "base_model.model."
SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up"}
UNET_ROOTS = (
    "down_blocks.",
    "up_blocks.",
    "mid_block.",
    "conv_in",
    "conv_out",
    "time_embedding.",
    "add_embedding.",
)
TEXT_ROOTS = ("text_model.", "encoder.layers.", "text_projection")


def parse_config(raw: bytes) -> dict:
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterInvalid(f"{CONFIG_NAME} is {len(raw)} bytes, more than {MAX_CONFIG_BYTES}")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise AdapterInvalid(f"{CONFIG_NAME} repeats a key")
        return dict(pairs)

    try:
        config = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError):
        raise AdapterInvalid(f"{CONFIG_NAME} is not valid JSON") from None
    if not isinstance(config, dict):
        raise AdapterInvalid(f"{CONFIG_NAME} is not a JSON object")
    return config


def is_peft_key(key: str) -> bool:
    return any(key.endswith(s) for s in SUFFIXES)


def _component(path: str, names: set[str] | None, preferred: str | None = None) -> str:
    if names:
        for component in (preferred, "unet", "text_encoder", "text_encoder_2"):
            if component and resolve_key(f"{component}.{path}", names) in names:
                return component
    if path.startswith(UNET_ROOTS):
        return "unet"
    if path.startswith(TEXT_ROOTS):
        return "text_encoder"
    raise InvalidArgument(
        f"cannot tell which model the PEFT module {path!r} belongs to; pass module_names (the base model's "
        "module keys) to load_adapter"
    )


def _file_component(tensors: Mapping[str, torch.Tensor], names: set[str] | None) -> str | None:
    """The one component that holds every module of the file, the first of them when several do.

    A PEFT file is one model's: SDXL's two text encoders share their module paths, and the file
    is ``text_encoder_2``'s when only that one has them all (its ``text_projection``, its layers
    beyond the first encoder's); when both have them all, ``text_encoder``.
    """
    if not names:
        return None
    paths = {_path(key) for key in tensors if is_peft_key(key)}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        if paths and all(resolve_key(f"{component}.{path}", names) in names for path in paths):
            return component
    return None


def _path(key: str) -> str:
    for suffix in SUFFIXES:
        key = key.removesuffix(suffix)
    return key.removeprefix(PREFIX)


def read(
    tensors: Mapping[str, torch.Tensor], config: Mapping, names: set[str] | None
) -> dict[str, PendingModule]:
    check_peft_config(config, CONFIG_NAME)
    paths: dict[str, str] = {}  # path in the file -> module key
    preferred = _file_component(tensors, names)

    def parse(key: str) -> tuple[str, str] | None:
        for suffix, role in SUFFIXES.items():
            if key.endswith(suffix):
                path = _path(key)
                if path not in paths:
                    paths[path] = resolve_key(f"{_component(path, names, preferred)}.{path}", names)
                return paths[path], role
        return None

    pending = collect(tensors, parse, "PEFT")
    for path, key in paths.items():
        item = pending[key]
        if item.down is not None:
            item.alpha = peft_alpha(config, path, int(item.down.shape[0]))
    return pending
