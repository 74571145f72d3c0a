"""kohya sd-scripts / A1111 / ComfyUI LoRA files, and the LyCORIS files written the same way.

Keys are ``<prefix><flattened module path>.lora_down.weight``, ``.lora_up.weight``
and ``.alpha`` with prefix ``lora_unet_``, ``lora_te_`` (SD 1.x/2.x text encoder)
or ``lora_te1_``/``lora_te2_`` (SDXL). Module paths are flattened with
underscores, so reading needs the base model's module names. LyCORIS networks
(``lycoris.kohya``) use the same names with their own tensors (``lora_mid``,
``hada_*``, ``lokr_*``, ``diff``/``diff_b``, ``dora_scale``; ``common.LYCORIS_SUFFIXES``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping

import torch

from adapters.canonical import LoraAdapter
from adapters.errors import InvalidArgument
from adapters.formats.base_ref import base_metadata, kohya_version
from adapters.formats.common import PendingModule, collect, module_tensors, split_suffix
from adapters.formats.names import KOHYA_PREFIXES, kohya_flat_path, kohya_lookup, kohya_prefix
from adapters.safeparse import write_safetensors


def is_kohya_key(key: str) -> bool:
    return key.startswith(tuple(KOHYA_PREFIXES))


def read(tensors: Mapping[str, torch.Tensor], names: set[str] | None) -> dict[str, PendingModule]:
    if not names:
        raise InvalidArgument(
            "this is a kohya/A1111 LoRA: its keys flatten module paths with underscores, which can only be "
            "mapped back with the base model's module names; pass module_names (the keys of module_shapes)"
        )
    lookup = kohya_lookup(names)
    # Longest prefix first: "lora_te1_" must not be read as "lora_te_" + "1_...".
    prefixes = sorted(KOHYA_PREFIXES.items(), key=lambda item: -len(item[0]))

    def parse(key: str) -> tuple[str, str] | None:
        split = split_suffix(key)
        if split is None:
            return None
        stem, role = split
        for prefix, component in prefixes:
            if stem.startswith(prefix):
                flat = stem[len(prefix) :]
                # An unknown module keeps its flattened name; validation then lists it.
                return lookup.get(f"{component}:{flat}", f"{component}.{flat}"), role
        return None

    return collect(tensors, parse, "kohya")


def to_kohya(adapter: LoraAdapter) -> bytes:
    """kohya-compatible safetensors (A1111 and ComfyUI load it); alpha is an F32 scalar.

    LoHa, LoKr, diff and DoRA modules are written with LyCORIS' tensor names, and such a file
    says ``ss_network_module = lycoris.kohya`` with its ``algo`` (unless the metadata says already).
    """
    sdxl_text = "text_encoder_2" in adapter.components
    tensors: dict[str, torch.Tensor] = {}
    stems: set[str] = set()
    for key, module in adapter.modules.items():
        component = key.split(".", 1)[0]
        stem = kohya_prefix(component, sdxl_text) + kohya_flat_path(key)
        if stem in stems:
            raise InvalidArgument(f"two modules flatten to the same kohya name {stem!r}")
        stems.add(stem)
        tensors.update(module_tensors(stem, module))
    metadata = dict(adapter.metadata)
    metadata.update(base_metadata(adapter.base))
    metadata.pop("loraloom.format", None)
    metadata.pop(
        "lora_adapter_metadata", None
    )  # diffusers' layout key; diffusers misreads kohya files with it
    ranks = Counter(m.rank for m in adapter.modules.values() if m.factored)
    alphas = Counter(m.alpha for m in adapter.modules.values() if m.factored)
    algo = lycoris_algo(adapter)
    if algo is not None:
        metadata.setdefault("ss_network_module", "lycoris.kohya")
        metadata.setdefault("ss_network_args", json.dumps(algo))
    metadata.setdefault("ss_network_module", "networks.lora")
    metadata.setdefault("ss_network_dim", str(ranks.most_common(1)[0][0]) if ranks else "0")
    metadata.setdefault("ss_network_alpha", str(alphas.most_common(1)[0][0]) if alphas else "0")
    version = kohya_version(adapter.base.architecture) if adapter.base else None
    if version:
        metadata.setdefault("ss_base_model_version", version)
    return write_safetensors(tensors, metadata)


def lycoris_algo(adapter: LoraAdapter) -> dict[str, str] | None:
    """The ``ss_network_args`` LyCORIS would record for this adapter, ``None`` for plain LoRA/LoCon."""
    kinds = {module.kind for module in adapter.modules.values()}
    dora = [module.dora for module in adapter.modules.values() if module.dora is not None]
    if kinds <= {"lora"} and not dora:
        return None
    algo = {"lora": "locon", "loha": "loha", "lokr": "lokr", "diff": "full"}
    args = {"algo": algo[sorted(kinds - {"lora"})[0]] if kinds - {"lora"} else "locon"}
    if dora:
        args["dora_wd"] = "True"
        args["wd_on_output"] = str(all(scale.axis == "out" for scale in dora))
    return args
