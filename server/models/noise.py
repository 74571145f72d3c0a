"""Filters for known, harmless library noise, applied where it arises.

Only the exact messages below are dropped, on the handlers of the library that
emits them; every other warning still shows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

# transformers, importing image processors we never use, without torchvision.
_TRANSFORMERS_NOISE = r"requires torchvision \(not installed\)"
# diffusers: PEFT-injected LoRA layers make every LoRA key look "missing" or "unexpected"
# when a component is (re)loaded, and casting a model with `.to(dtype)` lists an empty set.
_DIFFUSERS_NOISE = (
    r"(?s)(No LoRA keys associated to|Some weights of the model checkpoint .*lora"
    r"|that should be kept in float32: \[\])"
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self._pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._pattern.search(record.getMessage())


def _filter_library(root: logging.Logger, pattern: str) -> None:
    drop = _DropMatching(pattern)
    root.addFilter(drop)
    for handler in root.handlers:
        handler.addFilter(drop)


@lru_cache(maxsize=1)
def quiet_library_noise() -> None:
    """Install the filters once per process, before the libraries first speak."""
    from transformers.utils import logging as transformers_logging

    _filter_library(transformers_logging.get_logger(), _TRANSFORMERS_NOISE)
    from diffusers.utils import logging as diffusers_logging

    _filter_library(diffusers_logging.get_logger(), _DIFFUSERS_NOISE)


@contextmanager
def no_loading_bars() -> Iterator[None]:
    """Hide diffusers' "Loading pipeline components" bar; our own log line says what loaded."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
