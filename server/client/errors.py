"""Status codes back to the typed errors of ``adapters.errors``, so callers catch the same classes."""

from __future__ import annotations

import grpc

from adapters import errors
from server.api.errors import ANSWERED_KEY, RETRY_AFTER_KEY, RETRY_PUSHBACK_KEY


class ServerError(errors.LoraloomError):
    """The server failed for a reason it does not share (INTERNAL, UNKNOWN, ...)."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class Unreachable(errors.Unavailable):
    """No loraloom server answered at the address (refused, unresolvable, TLS failure, ...)."""


ERROR_BY_STATUS: dict[grpc.StatusCode, type[errors.LoraloomError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
}


def from_status(code: grpc.StatusCode, details: str | None, trailing_metadata=None) -> errors.LoraloomError:
    """The typed error for a failed call's status."""
    message = details or code.name
    kind = ERROR_BY_STATUS.get(code)
    if kind is None:
        return ServerError(message, code)
    if kind is errors.ResourceExhausted:
        return errors.ResourceExhausted(message, retry_after_s=_retry_after(trailing_metadata))
    if kind is errors.Unavailable and not any(key == ANSWERED_KEY for key, _ in trailing_metadata or ()):
        return Unreachable(message)
    return kind(message)


def from_rpc_error(error: grpc.RpcError) -> errors.LoraloomError:
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return from_status(error.code(), error.details(), metadata)


def _retry_after(metadata) -> float:
    for key, value in metadata or ():
        try:
            if key == RETRY_PUSHBACK_KEY:
                return int(value) / 1000.0
            if key == RETRY_AFTER_KEY:
                return float(value)
        except ValueError:
            continue
    return 1.0
