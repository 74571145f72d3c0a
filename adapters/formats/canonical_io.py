"""The canonical safetensors layout (``loraloom.format = "canonical/1"``).

Tensors, one module key ``<component>.<module path>`` each:

- ``<module key>.lora_down.weight``: A, ``(rank, in)`` or ``(rank, in, kh, kw)``
- ``<module key>.lora_up.weight``: B, ``(out, rank)`` or ``(out, rank, 1, 1)``
- ``<module key>.alpha``: F32 scalar; the update is ``alpha / rank * B @ A``

The other kinds use LyCORIS' tensor names at the module key (``<module key>.hada_w1_a``,
``.lokr_w1``, ``.lora_mid.weight``, ``.diff``, ``.diff_b``, ``.dora_scale`` shaped
``(out, 1, ...)`` or ``(1, in, ...)``; ``common.LYCORIS_SUFFIXES``); a plain LoRA is
written exactly as it always was.

Metadata: ``loraloom.format = "canonical/1"``, ``loraloom.base_architecture`` and
``loraloom.base_fingerprint`` (when the base is known), and every other key of
the adapter's metadata passed through unchanged. Factors keep their dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adapters.canonical import LoraAdapter
from adapters.formats.base_ref import FORMAT_KEY, base_metadata
from adapters.formats.common import PendingModule, collect, module_tensors, split_suffix
from adapters.formats.names import resolve_key
from adapters.safeparse import write_safetensors

FORMAT = "canonical/1"


def parse_key(key: str) -> tuple[str, str] | None:
    return split_suffix(key)


def read(tensors: Mapping[str, torch.Tensor], names: set[str] | None) -> dict[str, PendingModule]:
    def parse(key: str) -> tuple[str, str] | None:
        parsed = parse_key(key)
        return None if parsed is None else (resolve_key(parsed[0], names), parsed[1])

    return collect(tensors, parse, "canonical")


def save_canonical(adapter: LoraAdapter) -> bytes:
    """The adapter as canonical safetensors bytes (deterministic for equal adapters)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, module in adapter.modules.items():
        tensors.update(module_tensors(key, module))
    metadata = {k: v for k, v in adapter.metadata.items() if not k.startswith("loraloom.base_")}
    metadata.update(base_metadata(adapter.base))
    metadata[FORMAT_KEY] = FORMAT
    return write_safetensors(tensors, metadata)
