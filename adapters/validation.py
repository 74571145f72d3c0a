"""Check an adapter against the base model it is about to be applied to.

The base model is known here only as ``ModuleShapes`` (module key -> weight
shape) and, optionally, a ``BaseModelRef``. Everything that would otherwise be
discovered at inference as a silent "key not loaded" is refused up front, with
the list of offending modules.
"""

from __future__ import annotations

from adapters.canonical import BaseModelRef, LoraAdapter, ModuleShapes
from adapters.errors import AdapterIncompatible, AdapterInvalid
from adapters.formats.base_ref import normalize_architecture
from adapters.formats.names import text_model_aliases

SHOWN = 5
SDXL_SGM_MARKERS = ("input_blocks", "output_blocks", "middle_block")


def _listing(items: list[str]) -> str:
    shown = "; ".join(items[:SHOWN])
    return shown + (f"; and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def validate_against_base(
    adapter: LoraAdapter, shapes: ModuleShapes, base: BaseModelRef | None = None
) -> None:
    """Raise unless every module of ``adapter`` exists in the base with the same weight shape.

    ``AdapterInvalid``: the adapter is empty or has a rank-0 module.
    ``AdapterIncompatible``: it was made for another architecture (when both the
    adapter and ``base`` say), or names modules the base lacks, or shapes differ.
    An adapter or base without an architecture is judged by shapes alone.
    """
    if not adapter.modules:
        raise AdapterInvalid("the adapter holds no LoRA modules")
    zero = [key for key, module in adapter.modules.items() if module.rank == 0]
    if zero:
        raise AdapterInvalid(f"{len(zero)} module(s) have rank 0: {_listing(zero)}")
    if base is not None and adapter.base is not None:
        made_for = normalize_architecture(adapter.base.architecture)
        serving = normalize_architecture(base.architecture)
        if made_for and serving and made_for != serving:
            raise AdapterIncompatible(
                f"the adapter was made for a {made_for} base model but this base model is {serving}; "
                f"use a {serving} adapter (a LoRA only fits the architecture it was trained on)"
            )
    unknown: list[str] = []
    mismatched: list[str] = []
    for key, module in adapter.modules.items():
        expected = shapes.get(key)
        if expected is None:
            unknown.append(key)
        elif tuple(expected) != module.weight_shape:
            mismatched.append(
                f"{key}: adapter updates {list(module.weight_shape)}, base weight is {list(expected)}"
            )
    if not unknown and not mismatched:
        return
    parts: list[str] = []
    if unknown:
        parts.append(f"{len(unknown)} module(s) not in the base model: {_listing(unknown)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
    hint = "the adapter was made for a different base model; use one trained for this base"
    if any(alias in shapes for key in unknown for alias in text_model_aliases(key)[1:]):
        hint = (
            "some text-encoder keys differ only by the 'text_model.' level; load the adapter with "
            "module_names=<the base's module keys> so they are matched"
        )
    elif any(marker in key for key in unknown for marker in SDXL_SGM_MARKERS):
        hint = (
            "module names like input_blocks/output_blocks are SDXL (sgm) names; use an adapter for this base"
        )
    raise AdapterIncompatible(f"adapter does not fit the base model: {'. '.join(parts)}. {hint}")
