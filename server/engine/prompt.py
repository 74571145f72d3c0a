"""The prompt syntax SD users type: ``<lora:name:0.8>``, ``<lora:name@3:0.8>``, ``<lora:name>``.

Each tag becomes one ``(ref, weight)`` entry of the blend (weight 1.0 when
omitted) and is removed from the text. A pure module: no torch, no store.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from adapters.errors import InvalidArgument

# <lora:REF> or <lora:REF:WEIGHT>; REF is anything without ':', '<', '>' or whitespace.
_TAG = re.compile(r"<lora:([^:<>\s]*)(?::([^<>]*))?>", re.IGNORECASE)
_SPACES = re.compile(r"[ \t]{2,}")


@dataclass(frozen=True)
class ParsedPrompt:
    """The prompt with its tags removed, and the tags as ``(ref, weight)`` in order of appearance."""

    text: str
    adapters: tuple[tuple[str, float], ...]


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Split ``<lora:...>`` tags out of ``prompt``; raise ``InvalidArgument`` on a malformed tag."""
    adapters: list[tuple[str, float]] = []

    def take(match: re.Match[str]) -> str:
        ref, weight_text = match.group(1), match.group(2)
        if not ref:
            raise InvalidArgument(f"prompt tag {match.group(0)!r} names no adapter: write <lora:name:0.8>")
        adapters.append((ref, _weight(match.group(0), weight_text)))
        return " "

    text = _TAG.sub(take, prompt)
    text = _SPACES.sub(" ", text)
    text = re.sub(r"\s+([,.;])", r"\1", text).strip()
    return ParsedPrompt(text=text, adapters=tuple(adapters))


def _weight(tag: str, text: str | None) -> float:
    if text is None or not text.strip():
        return 1.0
    try:
        weight = float(text.strip())
    except ValueError:
        raise InvalidArgument(
            f"prompt tag {tag!r}: weight {text!r} is not a number; write <lora:name:0.8> "
            "(separate text-encoder/UNet weights are not supported)"
        ) from None
    if not math.isfinite(weight):
        raise InvalidArgument(f"prompt tag {tag!r}: weight must be a finite number")
    return weight
