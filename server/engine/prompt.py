"""The prompt syntax SD users type: ``<lora:name:0.8>``, ``<lora:name@3:0.8>``, ``<lora:name>``,
and A1111's per-part weights ``<lora:name:0.8:0.5>`` (text encoder, UNet) and
``<lora:name:te=0.8:unet=0.5>`` (``adapters.weights.parse_weights``: a part not given
takes the text-encoder weight, else 1.0).

Each tag becomes one ``(ref, weight)`` entry of the blend (weight 1.0 when
omitted; ``PartWeights`` when the parts differ) and is removed from the text. A
pure module: no torch, no store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapters.errors import InvalidArgument
from adapters.weights import Weight, parse_weights

# <lora:REF> or <lora:REF:WEIGHT>; REF is anything without ':', '<', '>' or whitespace.
_TAG = re.compile(r"<lora:([^:<>\s]*)(?::([^<>]*))?>", re.IGNORECASE)
_SPACES = re.compile(r"[ \t]{2,}")


@dataclass(frozen=True)
class ParsedPrompt:
    """The prompt with its tags removed, and the tags as ``(ref, weight)`` in order of appearance."""

    text: str
    adapters: tuple[tuple[str, Weight], ...]


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Split ``<lora:...>`` tags out of ``prompt``; raise ``InvalidArgument`` on a malformed tag."""
    adapters: list[tuple[str, Weight]] = []

    def take(match: re.Match[str]) -> str:
        ref, weight_text = match.group(1), match.group(2)
        if not ref:
            raise InvalidArgument(f"prompt tag {match.group(0)!r} names no adapter: write <lora:name:0.8>")
        fields = [] if weight_text is None else weight_text.split(":")
        adapters.append((ref, parse_weights(fields, f"prompt tag {match.group(0)!r}")))
        return " "

    text = _TAG.sub(take, prompt)
    text = _SPACES.sub(" ", text)
    text = re.sub(r"\s+([,.;])", r"\1", text).strip()
    return ParsedPrompt(text=text, adapters=tuple(adapters))
