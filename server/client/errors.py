"""Status codes back to the typed errors of ``adapters.errors``, so callers catch the same classes."""

from __future__ import annotations

import grpc

from adapters import errors
from server.wire import ANSWERED_KEY, RETRY_AFTER_KEY, RETRY_PUSHBACK_KEY


class ServerError(errors.LoraloomError):
    """The server failed for a reason it does not share (INTERNAL, UNKNOWN, ...).

    ``code`` on an instance is the ``grpc.StatusCode`` received (the class keeps INTERNAL).
    """

    code: grpc.StatusCode  # type: ignore[assignment]

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class Unreachable(errors.Unavailable):
    """No loraloom server answered at the address (refused, unresolvable, TLS failure, ...)."""


# Each status code to the most general class carrying it: the direct subclasses of
# LoraloomError in adapters.errors (a subclass shares its parent's code). OUT_OF_RANGE
# is a bad argument too.
ERROR_BY_STATUS: dict[grpc.StatusCode, type[errors.LoraloomError]] = {
    grpc.StatusCode[kind.code]: kind
    for kind in errors.LoraloomError.__subclasses__()
    if kind.__module__ == errors.__name__ and kind.code != errors.LoraloomError.code
} | {grpc.StatusCode.OUT_OF_RANGE: errors.InvalidArgument}


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
