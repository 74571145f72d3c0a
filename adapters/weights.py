"""An adapter's weight in a blend: one number, or one per part of the model (no torch: the client
and the prompt parser use it too).

``PartWeights`` is A1111's ``<lora:name:te_weight:unet_weight>`` (and Gyre's named weights): one
weight for the text encoder(s), one for the UNet. ``PartWeights.of`` folds equal parts into the
plain float they are, so ``name:0.8`` and ``name:te=0.8:unet=0.8`` are one blend. In a blend's
signature an adapter with per-part weights gives two entries, ``<key>#te`` and ``<key>#unet``
(``weight_pairs``); a part weighted 0 applies nothing (that part of the model stays the base's).

``parse_weights`` reads the text forms (prompt tags and the CLI's ``--adapter``), with A1111's
rules: ``W`` weighs both parts; ``TE:UNET`` each; ``te=``/``unet=`` name a part; a part not
given takes the first number (the text-encoder weight), else 1.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from adapters.errors import InvalidArgument

TEXT_ENCODER_PART, UNET_PART = "te", "unet"
PART_SEPARATOR = "#"
PART_NAMES = {"te": TEXT_ENCODER_PART, "text_encoder": TEXT_ENCODER_PART, "unet": UNET_PART}


def part_of(module_key: str) -> str:
    """Which part of the model a module key is in: ``te`` (any text encoder) or ``unet``."""
    return TEXT_ENCODER_PART if module_key.startswith("text_encoder") else UNET_PART


@dataclass(frozen=True)
class PartWeights:
    """One adapter's weights per part: the text encoder(s) and the UNet."""

    text_encoder: float
    unet: float

    def __post_init__(self) -> None:
        for label, value in (("text encoder", self.text_encoder), ("UNet", self.unet)):
            if not math.isfinite(value):
                raise InvalidArgument(f"the {label} weight must be finite, is {value}")

    @classmethod
    def of(
        cls, weight: float = 1.0, text_encoder: float | None = None, unet: float | None = None
    ) -> float | PartWeights:
        """``weight`` for the parts not given; a float when both parts end up equal."""
        te = float(weight if text_encoder is None else text_encoder)
        un = float(weight if unet is None else unet)
        return te if te == un else cls(te, un)

    def part(self, name: str) -> float:
        return self.text_encoder if name == TEXT_ENCODER_PART else self.unet

    def __format__(self, spec: str) -> str:
        """``TE:UNET``, each number formatted with ``spec`` (the text ``parse_weights`` reads back)."""
        return f"{format(self.text_encoder, spec)}:{format(self.unet, spec)}"

    def __str__(self) -> str:
        return format(self, "g")


Weight = float | PartWeights


def as_weight(value: Weight | int) -> Weight:
    """A weight as the blend keeps it: a float, or ``PartWeights`` whose parts differ."""
    if isinstance(value, PartWeights):
        return PartWeights.of(text_encoder=value.text_encoder, unet=value.unet)
    return float(value)


def parts_of(weight: Weight) -> tuple[float, float]:
    """``(text encoder, UNet)`` weights of a weight."""
    if isinstance(weight, PartWeights):
        return weight.text_encoder, weight.unet
    return float(weight), float(weight)


def add_weights(first: Weight, second: Weight) -> Weight:
    """The weight of one adapter named twice in a blend: the parts add."""
    if not isinstance(first, PartWeights) and not isinstance(second, PartWeights):
        return float(first) + float(second)
    (te1, un1), (te2, un2) = parts_of(first), parts_of(second)
    return PartWeights.of(text_encoder=te1 + te2, unet=un1 + un2)


def weight_for(weight: Weight, module_key: str) -> float:
    """The weight an adapter is applied with on ``module_key``."""
    if isinstance(weight, PartWeights):
        return weight.part(part_of(module_key))
    return float(weight)


def is_zero(weight: Weight) -> bool:
    return parts_of(weight) == (0.0, 0.0)


def weight_pairs(key: str, weight: Weight) -> tuple[tuple[str, float], ...]:
    """A blend entry's signature pairs: ``(key, w)``, or ``(key#te, te)`` and ``(key#unet, unet)``
    when the parts differ (a zero part left out: it applies nothing)."""
    if not isinstance(weight, PartWeights):
        return ((key, float(weight)),)
    return tuple(
        (f"{key}{PART_SEPARATOR}{part}", value)
        for part, value in ((TEXT_ENCODER_PART, weight.text_encoder), (UNET_PART, weight.unet))
        if value != 0.0
    )


def parse_weights(fields: Sequence[str], where: str) -> Weight:
    """The weight written as ``fields`` (the text after ``name:``, split at ``:``), A1111's rules.

    ``[]``: 1.0; ``["0.8"]``: 0.8 for both parts; ``["0.8", "0.5"]``: text encoder 0.8, UNet 0.5;
    ``te=0.8`` / ``unet=0.5`` name a part (and may follow the numbers); a part not given takes the
    text-encoder weight. ``where`` names the text in error messages.
    """
    positional: list[float] = []
    named: dict[str, float] = {}
    for raw in fields:
        text = raw.strip()
        if not text and not positional and not named and len(fields) == 1:
            continue  # "name:" is "name"
        name, sep, value = text.partition("=")
        if sep:
            part = PART_NAMES.get(name.strip().lower())
            if part is None:
                raise InvalidArgument(
                    f"{where}: unknown weight name {name.strip()!r}; use te= (text encoder) or unet="
                )
            if part in named:
                raise InvalidArgument(f"{where}: the {part} weight is given twice")
            named[part] = _number(value, where)
        elif named:
            raise InvalidArgument(
                f"{where}: a plain weight after a named one; write NAME:TE:UNET or te=/unet="
            )
        else:
            positional.append(_number(text, where))
    if len(positional) > 2:
        raise InvalidArgument(
            f"{where}: at most two weights (text encoder, UNet) may follow the name, got {len(positional)}"
        )
    te = named.get(TEXT_ENCODER_PART, positional[0] if positional else 1.0)
    unet = named.get(UNET_PART, positional[1] if len(positional) > 1 else te)
    return PartWeights.of(text_encoder=te, unet=unet)


def _number(text: str, where: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise InvalidArgument(
            f"{where}: weight {text.strip()!r} is not a number; write name:0.8, name:0.8:0.5 (text "
            "encoder, UNet) or name:te=0.8:unet=0.5"
        ) from None
    if not math.isfinite(value):
        raise InvalidArgument(f"{where}: weight must be a finite number")
    return value
