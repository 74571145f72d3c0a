"""The store's validation hook: a callable that reads a staged adapter file and says what it is.

The store calls its validator on the fully written, hash-checked file before
anything becomes visible; the validator returns the facts to record or raises
an ``adapters.errors`` error (AdapterInvalid: unsafe, corrupt or unsupported;
AdapterIncompatible: does not fit the base model), and the store then keeps
neither a row nor a blob.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from adapters.canonical import BaseModelRef, LoraAdapter, ModuleShapes
from adapters.errors import AdapterInvalid
from adapters.formats.base_ref import ADAPTER_TYPE_KEY
from adapters.store.models import AdapterFacts

Validator = Callable[[Path], AdapterFacts]


def facts_of(adapter: LoraAdapter, format: str) -> AdapterFacts:
    """The facts a version records about a parsed adapter."""
    if not adapter.modules:
        raise AdapterInvalid("the adapter file holds no LoRA modules; nothing to register")
    return AdapterFacts(
        rank=max(adapter.ranks),
        components=tuple(sorted(adapter.components)),
        format=format,
        base=adapter.base,
        metadata={**adapter.metadata, ADAPTER_TYPE_KEY: adapter.kind},
    )


# Module names that match nothing: kohya keys then keep their flattened paths
# (``unet.down_blocks_0_...``), enough for rank and components without a base model.
_NO_BASE_MODEL = frozenset({"unet.__no_base_model__"})


def make_validator(
    shapes: ModuleShapes | None = None, base: BaseModelRef | None = None, *, max_rank: int | None = None
) -> Validator:
    """A validator built on ``adapters.formats`` and ``adapters.validation``.

    Always: the safe ``.safetensors`` parse (pre-check, finite values, pickle refused)
    and format detection (kohya, diffusers, PEFT with its config, canonical), with
    each module's factors checked. With ``shapes`` (the base model's module map):
    every target module must exist with matching shapes, and ``base`` (when given)
    must match the architecture the adapter was made for; an adapter whose file does
    not say what it was made for is then recorded as made for ``base``'s architecture
    (it fits it). Without ``shapes`` the fit to a base model is left to whoever loads
    the adapter.
    """
    module_names = frozenset(shapes) if shapes is not None else _NO_BASE_MODEL

    def validate(path: Path) -> AdapterFacts:
        from adapters.formats import detect_format, parse_adapter
        from adapters.safeparse import read_safetensors

        tensors, metadata = read_safetensors(path)
        format = detect_format(tensors, metadata)
        adapter = parse_adapter(tensors, metadata, module_names=module_names)
        if shapes is not None:
            from adapters.validation import validate_against_base

            if max_rank is None:
                validate_against_base(adapter, shapes, base)
            else:
                validate_against_base(adapter, shapes, base, max_rank=max_rank)
            if adapter.base is None and base is not None:
                adapter.base = BaseModelRef(base.architecture)
        return facts_of(adapter, format)

    return validate
