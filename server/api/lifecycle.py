"""Readiness, draining and in-flight accounting of the server.

Health (``grpc.health.v1``): the empty service name is liveness (SERVING while the
process serves), ``loraloom.v1.Loraloom`` is readiness (SERVING once the base model
is loaded and warmed up, NOT_SERVING from the moment a drain starts).
``GateInterceptor`` refuses loraloom.v1 calls with UNAVAILABLE while not ready or
draining, and counts the calls in flight so a drain can wait for them; those still in
flight when the grace is over are ended with UNAVAILABLE (``end_calls``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from server.api.errors import ANSWERED, ServiceInterceptor, rewrap

SERVICE_NAME = "loraloom.v1.Loraloom"
LIVENESS = ""


class Lifecycle:
    """The server's state as health checks and new calls see it. Use on the event loop only."""

    def __init__(self) -> None:
        self.health = health_aio.HealthServicer()
        self.ready = False
        self.draining = False
        self.inflight = 0
        self.ending = False
        self._calls: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def mark_ready(self) -> None:
        self.ready = True
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    async def report_memory(self, ready: bool) -> None:
        """Readiness follows the engine's memory health (``server.readiness``): NOT_SERVING after
        repeated out-of-memory failures, so traffic moves elsewhere; calls are still accepted."""
        if self.ready and not self.draining:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ready
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await self.health.set(SERVICE_NAME, status)

    async def begin_drain(self) -> None:
        """Readiness goes NOT_SERVING now; new loraloom.v1 calls get UNAVAILABLE from here on."""
        self.draining = True
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no loraloom.v1 call is in flight; False when ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def end_calls(self) -> int:
        """The grace is over: each loraloom.v1 call in flight ends now with UNAVAILABLE.

        Its task is cancelled; a Generate's cancellation also stops its engine work at the
        next step. Returns how many calls were ended.
        """
        self.ending = True
        for task in self._calls:
            task.cancel()
        return len(self._calls)

    async def stopped(self) -> None:
        await self.health.enter_graceful_shutdown()

    def refusal(self) -> str | None:
        if self.draining:
            return "the server is shutting down; retry on another replica"
        if not self.ready:
            return "the server is starting (base model not loaded and warmed up yet); retry shortly"
        return None

    def enter(self, task: asyncio.Task | None = None) -> None:
        self.inflight += 1
        self._idle.clear()
        if task is not None:
            self._calls.add(task)

    def leave(self, task: asyncio.Task | None = None) -> None:
        self.inflight -= 1
        self._calls.discard(task)
        if self.inflight == 0:
            self._idle.set()


class GateInterceptor(ServiceInterceptor):
    """UNAVAILABLE while not ready or draining; counts loraloom.v1 calls in flight."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return _gated(handler, self.lifecycle)


ENDED = "the server shut down while this call ran (its grace period is over); retry on another replica"


@contextlib.asynccontextmanager
async def _admitted(lifecycle: Lifecycle, context) -> AsyncIterator[None]:
    """Run one call's body if the server takes calls now, counted as in flight; a call cancelled
    because the grace ended answers UNAVAILABLE."""
    reason = lifecycle.refusal()
    if reason:
        await context.abort(grpc.StatusCode.UNAVAILABLE, reason, trailing_metadata=ANSWERED)
    task = asyncio.current_task()
    lifecycle.enter(task)
    try:
        yield
    except asyncio.CancelledError:
        if not lifecycle.ending:
            raise
        await context.abort(grpc.StatusCode.UNAVAILABLE, ENDED, trailing_metadata=ANSWERED)
    finally:
        lifecycle.leave(task)


def _gated(handler: grpc.RpcMethodHandler, lifecycle: Lifecycle) -> grpc.RpcMethodHandler:
    def unary(behaviour):
        async def wrapped(request, context):
            async with _admitted(lifecycle, context):
                return await behaviour(request, context)

        return wrapped

    def streaming(behaviour):
        async def wrapped(request, context):
            async with _admitted(lifecycle, context):
                async for response in behaviour(request, context):
                    yield response

        return wrapped

    return rewrap(handler, unary=unary, stream=streaming)
