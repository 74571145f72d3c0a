"""Rewrite an adapter file in another format, for a known base model (``loraloom adapters convert``).

The base is what makes a conversion exact: its module names map kohya's flattened
names (diffusers' or SGM's) back to modules, and decide the SGM numbering of an SDXL
kohya file; the adapter is checked against it before anything is written.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from adapters.canonical import BaseModelRef, LoraAdapter, ModuleShapes
from adapters.errors import InvalidArgument
from adapters.formats import load_adapter, save_canonical, to_diffusers, to_kohya
from adapters.validation import validate_against_base

TARGETS: tuple[str, ...] = ("kohya", "diffusers", "canonical")


def convert_adapter(
    source: bytes | str | os.PathLike,
    to: str,
    *,
    shapes: ModuleShapes,
    base: BaseModelRef | None = None,
    flat_text_encoder: bool | None = None,
) -> tuple[LoraAdapter, bytes]:
    """The adapter in ``source`` (any format ``load_adapter`` reads) and its bytes in format ``to``.

    Raises ``AdapterIncompatible`` when it does not fit the base (another architecture, unknown
    modules, other shapes). No rank limit applies: that is a server's setting. An adapter whose
    file does not say what it was made for is recorded as made for ``base``'s architecture.
    ``flat_text_encoder``: as ``to_diffusers`` (the base's ``CLIPTextModel`` has no ``text_model``).
    """
    if to not in TARGETS:
        raise InvalidArgument(f"unknown target format {to!r}; one of {', '.join(TARGETS)}")
    adapter = load_adapter(source, module_names=shapes)
    validate_against_base(adapter, shapes, base, max_rank=sys.maxsize)
    if adapter.base is None and base is not None:
        adapter.base = BaseModelRef(base.architecture)
    return adapter, write(adapter, to, module_names=shapes, flat_text_encoder=flat_text_encoder)


def write(
    adapter: LoraAdapter,
    to: str,
    *,
    module_names: Iterable[str] | None = None,
    flat_text_encoder: bool | None = None,
) -> bytes:
    if to == "kohya":
        return to_kohya(adapter, module_names=module_names)
    if to == "diffusers":
        return to_diffusers(adapter, flat_text_encoder=flat_text_encoder)
    return save_canonical(adapter)
