"""The model layer's typed error."""

from __future__ import annotations

from adapters.errors import FailedPrecondition


class BaseModelError(FailedPrecondition):
    """The base model cannot be loaded as asked; the message says what to fix."""
