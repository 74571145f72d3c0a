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
from functools import partial
from typing import Any

import grpc
from grpc import aio

from adapters import errors
from server.wire import ANSWERED, RETRY_AFTER_KEY, RETRY_PUSHBACK_KEY
from server.wire import ANSWERED_KEY as ANSWERED_KEY  # re-exported; the trailer keys live in server.wire

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/loraloom.v1.Loraloom/"

Behaviour = Callable[..., Any]  # a handler's (request, context) coroutine or async generator
Wrapper = Callable[[Behaviour], Behaviour]
_FACTORIES = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status code, client-facing message and trailing metadata for ``error``.

    A ``LoraloomError`` maps to the status its class names in ``code``; only those that are
    not INTERNAL show their message. Anything else is INTERNAL with a generic message and an id.
    """
    if isinstance(error, errors.LoraloomError):
        code = grpc.StatusCode[type(error).code]
        if code is not grpc.StatusCode.INTERNAL:
            return code, str(error) or type(error).__name__, _trailers(error)
    incident = uuid.uuid4().hex[:12]
    message = f"internal error (incident {incident}; details in the server log)"
    return grpc.StatusCode.INTERNAL, message, ANSWERED


def _trailers(error: BaseException) -> tuple[tuple[str, str], ...]:
    if isinstance(error, errors.ResourceExhausted):
        if error.retry_after_s < 0:  # DO_NOT_RETRY: gRPC's negative pushback, and no retry-after-s
            return ((RETRY_PUSHBACK_KEY, "-1"), *ANSWERED)
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
    return rewrap(
        handler, unary=partial(_wrap_unary, method=method), stream=partial(_wrap_stream, method=method)
    )


def rewrap(handler: grpc.RpcMethodHandler, *, unary: Wrapper, stream: Wrapper) -> grpc.RpcMethodHandler:
    """``handler`` of the same kind and (de)serializers, its behaviour wrapped (the one four-way split).

    ``stream`` wraps async-generator behaviours (streaming responses); ``unary`` wraps coroutine
    ones (unary responses, and streaming ones that write with ``context.write()``).
    """
    for kind, factory in _FACTORIES:
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            wrap = stream if inspect.isasyncgenfunction(behaviour) else unary
            return factory(
                wrap(behaviour),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


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
    async def wrapped(request, context):
        try:
            async for response in behaviour(request, context):
                yield response
        except aio.AbortError:
            raise
        except Exception as error:
            await abort_with(context, error, method)

    return wrapped
