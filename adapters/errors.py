"""Typed errors shared by the store, the engine, the trainer and the API.

The core raises these. Each class carries its gRPC status code by name in ``code``
(this package never imports grpc): the server maps an error to ``grpc.StatusCode[code]``
and the client maps a status back to the most general class carrying it (see
``server.api.errors`` and ``server.client.errors``). Subclasses inherit their parent's
code. Messages are meant for the person who sent the request: say what is wrong and
what to do about it.
"""

from __future__ import annotations


class LoraloomError(Exception):
    """Base of every error loraloom raises on purpose; on its own, a server fault (INTERNAL)."""

    code: str = "INTERNAL"  # a grpc.StatusCode name; subclasses inherit or override it


class InvalidArgument(LoraloomError):
    """The request or the adapter file is malformed (gRPC INVALID_ARGUMENT)."""

    code = "INVALID_ARGUMENT"


class AdapterInvalid(InvalidArgument):
    """An adapter file is unsafe, corrupt or of an unsupported type."""


class NotFound(LoraloomError):
    """An adapter, version or alias does not exist (gRPC NOT_FOUND)."""

    code = "NOT_FOUND"


class AlreadyExists(LoraloomError):
    """Something that must be unique already exists (gRPC ALREADY_EXISTS)."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(LoraloomError):
    """The request is well formed but does not fit the current state (gRPC FAILED_PRECONDITION)."""

    code = "FAILED_PRECONDITION"


class AdapterIncompatible(FailedPrecondition):
    """An adapter does not fit the base model (unknown modules, wrong shapes, other architecture)."""


class ResourceExhausted(LoraloomError):
    """A queue or a cache is full (gRPC RESOURCE_EXHAUSTED); retry after ``retry_after_s``."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OutOfMemory(ResourceExhausted):
    """A generation ran out of memory; its memory was released (gRPC RESOURCE_EXHAUSTED)."""


class Unavailable(LoraloomError):
    """The server is draining or not ready yet, or a part it needs cannot be reached now (gRPC
    UNAVAILABLE): retry."""

    code = "UNAVAILABLE"


class DeadlineExceeded(LoraloomError):
    """The request ran past its deadline (gRPC DEADLINE_EXCEEDED)."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(LoraloomError):
    """The client cancelled the request (gRPC CANCELLED)."""

    code = "CANCELLED"


class DataLoss(LoraloomError):
    """Stored bytes are damaged: a blob failed its sha256 check (gRPC DATA_LOSS).

    The server's damage, not the caller's: say which blob and to run the store's verify
    (or re-upload the adapter).
    """

    code = "DATA_LOSS"


class BlobDamaged(DataLoss):
    """A stored version's bytes are missing, fail their sha256 or cannot be decoded (gRPC DATA_LOSS).

    ``reason`` is one of ``adapters.store.integrity.LOAD_FAILURE_REASONS`` (``sha256_mismatch``,
    ``missing``, ``undecodable``); ``ref`` names the version (``name@3``), ``sha256`` its blob.
    """

    def __init__(
        self, message: str, *, reason: str = "sha256_mismatch", ref: str = "", sha256: str = ""
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.ref = ref
        self.sha256 = sha256


class StoreUnreachable(Unavailable):
    """The adapter store's database cannot be reached right now (gRPC UNAVAILABLE); retry shortly."""
