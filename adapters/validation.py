"""Check an adapter against the base model it is about to be applied to.

The base model is known here only as ``ModuleShapes`` (module key -> weight
shape) and, optionally, a ``BaseModelRef``. Everything that would otherwise be
discovered at inference as a silent "key not loaded" is refused up front, with
the list of offending modules.
"""

from __future__ import annotations

from adapters.canonical import BaseModelRef, LoraAdapter, Module, ModuleShapes
from adapters.errors import AdapterIncompatible, AdapterInvalid
from adapters.formats.base_ref import architecture_family, compatible_architectures, normalize_architecture
from adapters.formats.names import text_model_aliases

SHOWN = 5
DEFAULT_MAX_RANK = 1024
SDXL_SGM_MARKERS = ("input_blocks", "output_blocks", "middle_block")


def _listing(items: list[str]) -> str:
    shown = "; ".join(items[:SHOWN])
    return shown + (f"; and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _rank_cap(module: Module, max_rank: int) -> int | None:
    """The highest rank ``module`` may have, ``None`` when it has no low-rank factors to cap
    (a diff or a full-matrix LoKr: their size is the weight's at most)."""
    return max_rank if module.factored else None


def _dora_mismatch(module: Module, shape: tuple[int, ...]) -> str | None:
    if module.dora is None:
        return None
    size = int(module.dora.magnitude.numel())
    expected = int(shape[0]) if module.dora.axis == "out" else int(shape[1])
    if size == expected:
        return None
    where = "output rows" if module.dora.axis == "out" else "input channels"
    return f"DoRA magnitude has {size} values for {expected} {where}"


def validate_against_base(
    adapter: LoraAdapter,
    shapes: ModuleShapes,
    base: BaseModelRef | None = None,
    *,
    max_rank: int = DEFAULT_MAX_RANK,
) -> None:
    """Raise unless every module of ``adapter`` exists in the base with the same weight shape.

    ``AdapterInvalid``: the adapter is empty, has a rank-0 module, or a rank above ``max_rank``.
    The rank checked is the network dim of the factored kinds (LoRA/LoCon: r; LoHa: the inner
    dimension r of each Hadamard factor, whose product can reach rank r^2; LoKr: r of its
    low-rank factor); a diff and a LoKr of two full matrices have none (``canonical``). A rank
    above the smaller dimension of the weight is accepted (LyCORIS' full preset puts its conv
    dim on SD's 4-channel ``conv_out``): the engine keeps such a module's update dense, which
    is then smaller than its factors (``adapters.blend.prepare_module``).
    ``AdapterIncompatible``: it was made for another architecture (when both the
    adapter and ``base`` say), or names modules the base lacks, or shapes differ.
    An adapter or base without an architecture is judged by shapes alone.
    """
    if not adapter.modules:
        raise AdapterInvalid("the adapter holds no LoRA modules")
    zero = [key for key, module in adapter.modules.items() if module.rank == 0]
    if zero:
        raise AdapterInvalid(f"{len(zero)} module(s) have rank 0: {_listing(zero)}")
    too_high = [
        f"{key}: rank {module.rank}"
        for key, module in adapter.modules.items()
        if (cap := _rank_cap(module, max_rank)) is not None and module.rank > cap
    ]
    if too_high:
        raise AdapterInvalid(
            f"{len(too_high)} module(s) have a rank above this server's limit of {max_rank}: "
            f"{_listing(too_high)}; retrain or resize the adapter to a lower rank"
        )
    if base is not None and adapter.base is not None:
        made_for = normalize_architecture(adapter.base.architecture)
        serving = normalize_architecture(base.architecture)
        if not compatible_architectures(made_for, serving):
            family = architecture_family(serving)
            named = serving if family == serving else f"{serving} ({family} family)"
            raise AdapterIncompatible(
                f"the adapter was made for a {made_for} base model but this base model is {named}; "
                f"use a {family} adapter (a LoRA only fits the architecture it was trained on)"
            )
    unknown: list[str] = []
    mismatched: list[str] = []
    for key, module in adapter.modules.items():
        expected = shapes.get(key)
        if expected is None:
            unknown.append(key)
        elif not module.fits(tuple(expected)):
            mismatched.append(
                f"{key}: adapter updates {list(module.weight_shape)}, base weight is {list(expected)}"
            )
        elif (problem := _dora_mismatch(module, tuple(expected))) is not None:
            mismatched.append(f"{key}: {problem}")
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
