"""Typed errors shared by the store, the engine, the trainer and the API.

The core raises these; one gRPC interceptor maps each class to a status code
(see ``server.api``). Messages are meant for the person who sent the request:
say what is wrong and what to do about it.
"""

from __future__ import annotations


class LoraloomError(Exception):
    """Base of every error loraloom raises on purpose."""


class InvalidArgument(LoraloomError):
    """The request or the adapter file is malformed (gRPC INVALID_ARGUMENT)."""


class AdapterInvalid(InvalidArgument):
    """An adapter file is unsafe, corrupt or of an unsupported type."""


class NotFound(LoraloomError):
    """An adapter, version or alias does not exist (gRPC NOT_FOUND)."""


class AlreadyExists(LoraloomError):
    """Something that must be unique already exists (gRPC ALREADY_EXISTS)."""


class FailedPrecondition(LoraloomError):
    """The request is well formed but does not fit the current state (gRPC FAILED_PRECONDITION)."""


class AdapterIncompatible(FailedPrecondition):
    """An adapter does not fit the base model (unknown modules, wrong shapes, other architecture)."""


class ResourceExhausted(LoraloomError):
    """A queue or a cache is full (gRPC RESOURCE_EXHAUSTED); retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(LoraloomError):
    """The server is draining or not ready yet (gRPC UNAVAILABLE)."""


class DeadlineExceeded(LoraloomError):
    """The request ran past its deadline (gRPC DEADLINE_EXCEEDED)."""


class Cancelled(LoraloomError):
    """The client cancelled the request (gRPC CANCELLED)."""
