"""kohya sd-scripts / A1111 / ComfyUI LoRA files, and the LyCORIS files written the same way.

Keys are ``<prefix><flattened module path>.lora_down.weight``, ``.lora_up.weight``
and ``.alpha`` with prefix ``lora_unet_``, ``lora_te_`` (SD 1.x/2.x text encoder)
or ``lora_te1_``/``lora_te2_`` (SDXL). Module paths are flattened with
underscores, so reading needs the base model's module names. SD 1.x/2.x files use
diffusers' UNet paths, SDXL files the SGM ones (``lora_unet_input_blocks_4_1_...``;
``sgm``); both are read on any base, and SDXL adapters are written with SGM names. LyCORIS networks
(``lycoris.kohya``) use the same names with their own tensors (``lora_mid``,
``hada_*``, ``lokr_*``, ``diff``/``diff_b``, ``dora_scale``; ``common.LYCORIS_SUFFIXES``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping

import torch

from adapters.canonical import LoraAdapter
from adapters.errors import InvalidArgument
from adapters.formats import sgm
from adapters.formats.base_ref import architecture_family, base_metadata, kohya_version
from adapters.formats.common import PendingModule, collect, module_tensors, split_suffix
from adapters.formats.names import KOHYA_PREFIXES, kohya_flat_path, kohya_lookup, kohya_prefix, split_key
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


def to_kohya(adapter: LoraAdapter, *, module_names: Iterable[str] | None = None) -> bytes:
    """kohya-compatible safetensors (A1111 and ComfyUI load it); alpha is an F32 scalar.

    An SDXL adapter (made for an SDXL-family base, or with ``text_encoder_2`` modules, or
    ``module_names`` of an SDXL base) is written as kohya's sd-scripts write SDXL: SGM UNet
    names and ``lora_te1_``/``lora_te2_``. The SGM numbering needs the base's layers per block,
    read from ``module_names`` (pass them whenever the base is known); without them, from the
    adapter's own keys when they tell it unambiguously, else SDXL's real layout (2 layers per
    block; ``sgm.layout_of_adapter``).
    LoHa, LoKr, diff and DoRA modules are written with LyCORIS' tensor names, and such a file
    says ``ss_network_module = lycoris.kohya`` with its ``algo`` (unless the metadata says already).
    """
    names = list(module_names) if module_names is not None else None
    sdxl = is_sdxl(adapter, names)
    layout = None
    if sdxl:
        layout = sgm.layout_of(names or ()) or sgm.layout_of_adapter(adapter.modules)
    tensors: dict[str, torch.Tensor] = {}
    stems: set[str] = set()
    for key, module in adapter.modules.items():
        stem = _stem(key, layout, sdxl)
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
    family = architecture_family(adapter.base.architecture) if adapter.base else ("sdxl" if sdxl else "")
    version = kohya_version(family)
    if version:
        metadata.setdefault("ss_base_model_version", version)
    return write_safetensors(tensors, metadata)


def is_sdxl(adapter: LoraAdapter, module_names: Iterable[str] | None = None) -> bool:
    """Whether the adapter is for an SDXL-family base: its base says so, it has a second text
    encoder, or the base's module names have one (or SDXL's added-conditioning embedding)."""
    if adapter.base is not None and architecture_family(adapter.base.architecture) == "sdxl":
        return True
    if "text_encoder_2" in adapter.components:
        return True
    return any(key.startswith(("text_encoder_2.", "unet.add_embedding.")) for key in module_names or ())


def _stem(key: str, layout: sgm.UnetLayout | None, sdxl: bool) -> str:
    component, path = split_key(key)
    if component != "unet" or layout is None:
        return kohya_prefix(component, sdxl) + kohya_flat_path(key)
    sgm_path = sgm.to_sgm(path, layout)
    if sgm_path is None:
        raise InvalidArgument(
            f"module {key!r} has no SGM name, which kohya's SDXL files use for the UNet; "
            "write the adapter with to_diffusers or save_canonical"
        )
    return "lora_unet_" + sgm_path.replace(".", "_")


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
