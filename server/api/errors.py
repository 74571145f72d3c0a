"""The one place typed errors become gRPC status codes (see DESIGN.md, "Errors").

``ErrorInterceptor`` wraps every loraloom.v1 method: a ``LoraloomError`` raised by the
service becomes its status code with the error's message; anything else becomes
INTERNAL with a generic message and an id, while the traceback goes to the log only.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable

import grpc
from grpc import aio

from adapters import errors

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/loraloom.v1.Loraloom/"

# Trailing metadata keys carrying the retry hint of RESOURCE_EXHAUSTED: gRPC's own
# retry pushback (honoured by clients with a retry policy) and a plain one in seconds.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
RETRY_AFTER_KEY = "retry-after-s"
# Set on every status a loraloom server sends, so a client can tell "the server said UNAVAILABLE
# (starting, draining)" from "nothing answered at that address" (same code, from the transport).
ANSWERED_KEY = "loraloom-answered"
ANSWERED: tuple[tuple[str, str], ...] = ((ANSWERED_KEY, "1"),)

# Subclasses come first where they share a parent; the first match wins.
STATUS_BY_ERROR: tuple[tuple[type[errors.LoraloomError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status code, client-facing message and trailing metadata for ``error``."""
    for kind, code in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return code, str(error) or kind.__name__, _trailers(error)
    incident = uuid.uuid4().hex[:12]
    message = f"internal error (incident {incident}; details in the server log)"
    return grpc.StatusCode.INTERNAL, message, ANSWERED


def _trailers(error: BaseException) -> tuple[tuple[str, str], ...]:
    if isinstance(error, errors.ResourceExhausted):
        seconds = max(float(error.retry_after_s), 0.0)
        hint = ((RETRY_PUSHBACK_KEY, str(round(seconds * 1000))), (RETRY_AFTER_KEY, f"{seconds:g}"))
        return hint + ANSWERED
    return ANSWERED


async def abort_with(context: aio.ServicerContext, error: BaseException, method: str) -> None:
    code, message, trailers = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed: %s", method, message, exc_info=error)
    else:
        log.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message, trailing_metadata=trailers)


class ServiceInterceptor(aio.ServerInterceptor):
    """An interceptor of loraloom.v1 calls only: ``wrap`` gets each of their handlers (others pass)."""

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(SERVICE_PREFIX):
            return handler
        return self.wrap(handler, handler_call_details)


class ErrorInterceptor(ServiceInterceptor):
    """Maps exceptions escaping loraloom.v1 handlers to status codes."""

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return wrap_handler(handler, details.method)


def wrap_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler`` with every behaviour wrapped so errors become statuses."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_wrap_unary(handler.unary_unary, method), **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_wrap_unary(handler.stream_unary, method), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_wrap_stream(handler.unary_stream, method), **kwargs)
    return grpc.stream_stream_rpc_method_handler(_wrap_stream(handler.stream_stream, method), **kwargs)


def _wrap_unary(behaviour, method: str):
    async def wrapped(request, context):
        try:
            return await behaviour(request, context)
        except aio.AbortError:
            raise
        except Exception as error:
            await abort_with(context, error, method)

    return wrapped


def _wrap_stream(behaviour, method: str):
    if not inspect.isasyncgenfunction(behaviour):
        return _wrap_unary(behaviour, method)  # a coroutine that writes with context.write()

    async def wrapped(request, context):
        try:
            async for response in behaviour(request, context):
                yield response
        except aio.AbortError:
            raise
        except Exception as error:
            await abort_with(context, error, method)

    return wrapped
