"""Adapter file formats in and out, all normalized to ``adapters.canonical``.

``load_adapter`` detects the format of a ``.safetensors`` file (bytes or a path):

- canonical (``loraloom.format = "canonical/1"``; see ``canonical_io``),
- kohya / A1111 / ComfyUI (``lora_unet_*``, ``lora_te_*``, ``lora_te1_*``/``lora_te2_*``
  with ``lora_down``/``lora_up``/``alpha``; LoCon conv layers included; the UNet under
  diffusers' names or, as kohya's SDXL files, SGM's: ``sgm``), and LyCORIS
  files in the same naming: LoCon with Tucker (``lora_mid``, folded into the pair),
  LoHa (``hada_*``), LoKr (``lokr_*``), full diffs (``diff``/``diff_b``) and DoRA
  (``dora_scale`` on LoRA, LoHa or LoKr),
- diffusers (``unet.<module>.lora_A/lora_B`` with ``lora_adapter_metadata``, and the
  older ``unet.<module>.lora.down/up`` and attention-processor layouts),
- PEFT (``<module>.lora_A/lora_B`` with ``adapter_config.json``: a folder, or the
  weights file with ``peft_config`` or a sibling ``adapter_config.json``).

OFT, BOFT, GLoRA, (IA)^3, PEFT's DoRA and other types are refused naming the type and
what to do (``common.refuse_unsupported``).
``module_names`` (the keys of the base model's ``module_shapes``) maps kohya's
flattened names back to module keys and matches text-encoder spellings with and
without ``text_model.``; pass it whenever the base model is known (to ``to_kohya``
too: an SDXL file's SGM numbering follows the base's layout). ``convert.convert_adapter``
rewrites a file for a base (``loraloom adapters convert``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from adapters.canonical import COMPONENTS, LoraAdapter
from adapters.errors import AdapterInvalid
from adapters.formats import canonical_io, diffusers_io, kohya, peft_io
from adapters.formats.base_ref import FORMAT_KEY, base_from_metadata, normalize_architecture
from adapters.formats.canonical_io import save_canonical
from adapters.formats.common import ReadHints, build_modules, refuse_unsupported
from adapters.formats.diffusers_io import to_diffusers
from adapters.formats.kohya import to_kohya
from adapters.safeparse import CONVERT_HINT, DEFAULT_LIMITS, ParseLimits, peek_header, read_safetensors

__all__ = [
    "detect_format",
    "load_adapter",
    "normalize_architecture",
    "parse_adapter",
    "save_canonical",
    "to_diffusers",
    "to_kohya",
]

LAYOUT_KEYS = {diffusers_io.METADATA_KEY}
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}


def detect_format(
    source: bytes | str | os.PathLike | Mapping[str, object],
    metadata: Mapping[str, str] | None = None,
    *,
    has_config: bool | None = None,
) -> str:
    """``canonical``, ``kohya``, ``diffusers`` or ``peft``; raises ``AdapterInvalid`` for anything else.

    ``source`` is a file (bytes, path or PEFT folder; only its header is read) or an
    already-read ``{name: tensor}`` map with its ``metadata``.
    """
    if isinstance(source, Mapping):
        return _detect(list(source), metadata or {}, bool(has_config))
    if not isinstance(source, bytes | bytearray | memoryview):
        path, config = _locate(Path(os.fspath(source)), None)
        has_config = config is not None if has_config is None else has_config
        source = path
    header = peek_header(source)
    return _detect(list(header.tensors), header.metadata, bool(has_config))


def _detect(keys: list[str], metadata: Mapping[str, str], has_config: bool) -> str:
    refuse_unsupported(keys, metadata)
    if metadata.get(FORMAT_KEY, "").startswith("canonical/"):
        return "canonical"
    if any(kohya.is_kohya_key(k) for k in keys):
        return "kohya"
    if any(diffusers_io.is_diffusers_key(k) for k in keys):
        return "diffusers"
    if any(peft_io.is_peft_key(k) for k in keys):
        if not has_config:
            raise AdapterInvalid(
                "this is a PEFT adapter (lora_A/lora_B keys without a component prefix) but its "
                f"{peft_io.CONFIG_NAME} (lora_alpha, r) was not given; upload the folder or pass the config"
            )
        return "peft"
    if keys and all(canonical_io.parse_key(k) and k.split(".", 1)[0] in COMPONENTS for k in keys):
        return "canonical"
    shown = ", ".join(repr(k) for k in keys[:3]) or "none"
    raise AdapterInvalid(
        f"no LoRA format recognised (first keys: {shown}); expected kohya (lora_unet_*), diffusers "
        "(unet.*.lora_A/lora_B), PEFT (*.lora_A/lora_B + adapter_config.json) or loraloom canonical"
    )


def parse_adapter(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    module_names: Iterable[str] | None = None,
    peft_config: Mapping | None = None,
) -> LoraAdapter:
    """Normalize already-read tensors and metadata (see ``load_adapter``)."""
    names = set(module_names) if module_names is not None else None
    fmt = _detect(list(tensors), metadata, peft_config is not None)
    if fmt == "canonical":
        pending = canonical_io.read(tensors, names)
        base = base_from_metadata(metadata)
        metadata = {
            k: v for k, v in metadata.items() if k != FORMAT_KEY and not k.startswith("loraloom.base_")
        }
    else:
        if fmt == "kohya":
            pending = kohya.read(tensors, names)
        elif fmt == "diffusers":
            pending = diffusers_io.read(tensors, metadata, names)
        else:
            pending = peft_io.read(tensors, peft_config or {}, names)
        base = base_from_metadata(metadata)
        # Layout details of the source format, already folded into the modules.
        metadata = {k: v for k, v in metadata.items() if k not in LAYOUT_KEYS}
    hints = ReadHints.of(metadata)
    return LoraAdapter(modules=build_modules(pending, hints), metadata=dict(metadata), base=base)


def load_adapter(
    source: bytes | str | os.PathLike,
    *,
    module_names: Iterable[str] | None = None,
    peft_config: Mapping | None = None,
    limits: ParseLimits = DEFAULT_LIMITS,
) -> LoraAdapter:
    """Read a ``.safetensors`` LoRA of any supported format into the canonical form.

    ``source``: the file's bytes, a path to it, or a PEFT / diffusers output folder.
    Raises ``AdapterInvalid`` for an unsafe, corrupt or unsupported file and
    ``InvalidArgument`` when the format needs ``module_names`` and none was given.
    """
    if not isinstance(source, bytes | bytearray | memoryview):
        source, peft_config = _locate(Path(os.fspath(source)), peft_config)
    tensors, metadata = read_safetensors(source, limits)
    return parse_adapter(tensors, metadata, module_names=module_names, peft_config=peft_config)


def _locate(path: Path, peft_config: Mapping | None) -> tuple[Path, Mapping | None]:
    """The weights file a path means, and the PEFT config next to it (when there is one)."""
    if path.is_dir():
        return _resolve_folder(path, peft_config)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterInvalid(f"{path.name}: only .safetensors adapters are accepted. {CONVERT_HINT}")
    if peft_config is None and path.name == peft_io.WEIGHTS_NAME:
        config_path = path.with_name(peft_io.CONFIG_NAME)
        if config_path.is_file():
            peft_config = _read_config(config_path)
    return path, peft_config


def _read_config(path: Path) -> dict:
    with path.open("rb") as fh:
        return peft_io.parse_config(fh.read(peft_io.MAX_CONFIG_BYTES + 1))


def _resolve_folder(folder: Path, peft_config: Mapping | None) -> tuple[Path, Mapping | None]:
    weights = folder / peft_io.WEIGHTS_NAME
    if weights.is_file():
        config_path = folder / peft_io.CONFIG_NAME
        if peft_config is None and config_path.is_file():
            peft_config = _read_config(config_path)
        return weights, peft_config
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0], peft_config
    raise AdapterInvalid(
        f"folder {folder.name!r} holds {len(candidates)} .safetensors files; point at the adapter file itself"
    )
