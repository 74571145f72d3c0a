"""Build and run the grpc.aio server: loraloom.v1, health, reflection, limits, SIGTERM drain.

Start-up: the port is bound and liveness is SERVING at once; readiness
(``loraloom.v1.Loraloom``) turns SERVING once the base model is loaded and warmed up.
Shutdown (SIGTERM or SIGINT): readiness goes NOT_SERVING at once, new loraloom.v1
calls get UNAVAILABLE, calls in flight get ``grace_s`` seconds to finish. A request
still running then is stopped at its next denoising step (its call gets UNAVAILABLE),
queued ones fail, the store closes, and the process exits 0 within grace + 1 s.

A step runs in native code (torch, OpenVINO) and cannot be interrupted. The engine's
worker is a daemon thread: if it is still inside a step when the interpreter tears
down, it is ended when it next takes the GIL (CPython ends such threads with
``pthread_exit``), and the forced unwinding through the binding's GIL guard, a
``noexcept`` destructor, calls ``std::terminate``: an abort (``terminate called
without an active exception``) after "stopped", where an exit 0 was due. So a stop
waits up to ``ENGINE_STOP_S`` for the step to end (so its call gets its status and
the store closes after it), and ``run`` always ends the process without the teardown
(``process.exit_now``), which also covers a model load or warm-up still running when
a stop comes during start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import NoReturn, TypeVar

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.api import process
from server.api.auth import AuthInterceptor, TokenTable
from server.api.errors import ErrorInterceptor
from server.api.lifecycle import GateInterceptor, Lifecycle
from server.api.logging import RequestLogger, configure
from server.api.pb.loraloom.v1 import service_pb2, service_pb2_grpc
from server.api.servicer import LoraloomServicer
from server.api.tls import server_credentials
from server.settings import Settings

log = logging.getLogger("loraloom.server")

ServiceFactory = Callable[[Settings], object]
T = TypeVar("T")
# After the grace (or at once from ``stop``): how long calls in flight get to send their
# last status, and how long the engine gets to finish its current step (its call was
# answered already). With the process's exit they keep a stop within grace + 1 s.
STOP_GRACE_S = 0.25
ENGINE_STOP_S = 0.25


def _default_factory(settings: Settings):
    from server.bootstrap import build_service

    return build_service(settings)


class LoraloomServer:
    """One grpc.aio server around one ``LoraloomService``. Use from a single event loop."""

    def __init__(self, config: Settings, service_factory: ServiceFactory | None = None) -> None:
        self.config = config
        self.factory = service_factory or _default_factory
        self.lifecycle = Lifecycle()
        self.servicer = LoraloomServicer(config)
        self.service = None
        self.port = 0
        self.health_port: int | None = None
        self._stop = asyncio.Event()
        self._threads: list[threading.Thread] = []
        self._flip: asyncio.Future | None = None
        self.tokens = TokenTable.load(config.api.tokens_file, config.api.tokens)
        self.credentials = server_credentials(
            config.api.tls_cert, config.api.tls_key, config.api.tls_client_ca
        )
        interceptors = [GateInterceptor(self.lifecycle), ErrorInterceptor()]
        if self.tokens:
            interceptors.insert(0, AuthInterceptor(self.tokens))
        self.metrics = None
        if config.api.metrics_port is not None:
            from server.api.metrics import Metrics

            self.metrics = Metrics()
            interceptors.insert(0, self.metrics.interceptor())
        self._health_server = None
        if config.api.health_port is not None:
            self._health_server = aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.lifecycle.health, self._health_server)
        self._server = aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", config.api.max_message_bytes),
                ("grpc.max_receive_message_length", config.api.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        service_pb2_grpc.add_LoraloomServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.lifecycle.health, self._server)
        names = (
            service_pb2.DESCRIPTOR.services_by_name["Loraloom"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, self._server)

    @property
    def address(self) -> str:
        return f"{self.config.api.host}:{self.port}"

    async def start(self) -> int:
        """Bind and start serving health and reflection; returns the port. Call ``load`` next."""
        if self.credentials is not None:
            self.port = self._server.add_secure_port(self.config.api.address, self.credentials)
        else:
            self.port = self._server.add_insecure_port(self.config.api.address)
        if not self.port:
            raise OSError(f"cannot listen on {self.config.api.address}")
        if self._health_server is not None:
            health_address = f"{self.config.api.host}:{self.config.api.health_port}"
            self.health_port = self._health_server.add_insecure_port(health_address)
            if not self.health_port:
                raise OSError(f"cannot listen on {health_address} (health)")
            await self._health_server.start()
        if self.metrics is not None:
            port = self.metrics.serve(self.config.api.host, self.config.api.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.config.api.host, port)
        await self._server.start()
        await self.lifecycle.start()
        log.info(
            "listening on %s (%s%s%s; readiness NOT_SERVING until the model is warmed up)",
            self.address,
            "mutual TLS" if self.config.api.tls_client_ca else "TLS" if self.credentials else "plaintext",
            ", bearer tokens" if self.tokens else "",
            f", health on {self.config.api.host}:{self.health_port}" if self.health_port else "",
        )
        return self.port

    async def load(self) -> None:
        """Load the base model and warm up (in a thread), then report ready."""
        self.service = await self._in_thread(self.factory, self.config, what="loading the model")
        self.servicer.service = self.service
        observers = getattr(self.service, "observers", None)
        if observers is not None:
            observers.append(RequestLogger(self.config.api.log_prompts))
        if self.metrics is not None:
            self.metrics.attach(self.service)
        memory = getattr(self.service, "memory", None)
        if memory is not None:
            loop = asyncio.get_running_loop()
            memory.listeners.append(
                lambda ready: asyncio.run_coroutine_threadsafe(self.lifecycle.report_memory(ready), loop)
            )
        await self._in_thread(self.service.warmup, what="warming up")
        await self.lifecycle.mark_ready()
        log.info("ready: serving loraloom.v1 on %s", self.address)

    def _in_thread(self, call: Callable[..., T], *args, what: str) -> asyncio.Future[T]:
        """``call(*args)`` on a daemon thread of its own (a model load cannot be interrupted).

        Unlike ``asyncio.to_thread``, whose threads ``asyncio.run`` waits for at exit, a
        stop does not wait for it: ``settled`` says whether it is still running. Its error
        fails the future; a ``BaseException`` (a library calling ``sys.exit``) becomes a
        ``StartupError``, so it fails the start rather than ending the process with its code.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(result, error) -> None:
            if future.done():  # cancelled: the server is stopping
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def main() -> None:
            result, error = None, None
            try:
                result = call(*args)
            except Exception as raised:
                error = raised
            except BaseException as raised:
                error = StartupError(f"{what} ended with {raised!r}")
                error.__cause__ = raised
            with contextlib.suppress(RuntimeError):  # a closed loop: the server stopped meanwhile
                loop.call_soon_threadsafe(settle, result, error)

        thread = threading.Thread(target=main, name=f"loraloom-{what.replace(' ', '-')}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return future

    @property
    def settled(self) -> bool:
        """No thread of this server is still inside a model load, a warm-up or an engine step."""
        engine = getattr(getattr(self.service, "scheduler", None), "stopped", True)
        return engine and not any(thread.is_alive() for thread in self._threads)

    def request_stop(self, signum: int | None = None) -> None:
        """Stop (on the loop: the signal handler): readiness goes NOT_SERVING now, then the drain."""
        if not self._stop.is_set():
            name = signal.Signals(signum).name if signum is not None else "a stop request"
            log.info("received %s", name)
            self._flip = asyncio.ensure_future(self.lifecycle.begin_drain())
        self._stop.set()

    async def wait_for_stop(self) -> None:
        await self._stop.wait()

    async def drain(self, grace_s: float | None = None) -> bool:
        """Stop taking calls, let those in flight finish within ``grace_s``, then stop. True: all finished.

        Past the grace, the calls still in flight get UNAVAILABLE at once, and the engine's
        running request stops at its next step.
        """
        grace = self.config.api.grace_s if grace_s is None else grace_s
        await self.lifecycle.begin_drain()
        log.info("draining: %d call(s) in flight, up to %.1fs", self.lifecycle.inflight, grace)
        finished = await self.lifecycle.wait_idle(grace)
        if not finished:
            ended = self.lifecycle.end_calls()
            log.warning("grace over; ended %d call(s) in flight, their work stops at its next step", ended)
        await self.stop()
        return finished

    async def stop(self) -> None:
        """Stop serving within about ``STOP_GRACE_S``: the engine stops at its next step, meanwhile
        the calls in flight send their status; then the store closes."""
        await self.lifecycle.stopped()
        closing = None
        if self.service is not None:
            closing = asyncio.ensure_future(asyncio.to_thread(self.service.close, timeout=ENGINE_STOP_S))
        await self._server.stop(STOP_GRACE_S)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self.metrics is not None:
            self.metrics.close()
        if closing is not None:
            await closing
        if self.settled:
            log.info("stopped")
        else:
            busy = [thread.name for thread in self._threads if thread.is_alive()]
            log.warning(
                "stopped; %s still inside native code (it stops at its next step)",
                ", ".join(busy) if busy else "the engine's current step",
            )


class StartupError(RuntimeError):
    """Loading the model or warming up ended its thread with something other than an ``Exception``."""


async def serve(config: Settings, service_factory: ServiceFactory | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain; the exit status (0 after a drain, 1 when the start failed)."""
    server = LoraloomServer(config, service_factory)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.request_stop, signum)
    await server.start()
    loader = asyncio.ensure_future(server.load())
    stopper = asyncio.ensure_future(server.wait_for_stop())
    await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if loader.done() and loader.exception() is not None:
        log.error("could not start: %s", loader.exception(), exc_info=loader.exception())
        stopper.cancel()
        await server.stop()
        return 1
    await stopper
    if not loader.done():
        log.warning("stopping before the model finished loading and warming up")
        loader.cancel()
    await server.drain()
    return 0


def run(config: Settings) -> NoReturn:
    """The body of ``loraloom serve``: serve until stopped, then end the process with the exit
    status: 0 after a stop, 1 after a failed start (logged, whatever ended it).

    The process ends without the interpreter's teardown (``process.exit_now``), once the
    server is stopped, the store closed and the log flushed: tearing down torch and
    OpenVINO takes seconds (a stop must end within grace + 1 s), and a thread still
    inside native code then aborts the process (see the module docstring).
    """
    configure(config.api.log_level, config.api.log_format)
    process.prepare()  # before OpenVINO is imported
    log.info("configuration: %s", config.summary())
    try:
        _quiet_progress_bars()
        code = asyncio.run(serve(config))
    except Exception as error:
        log.critical("the server failed: %s", error, exc_info=error)
        code = 1
    except SystemExit as exit:  # a library called sys.exit on the server's thread
        log.critical("the server was ended by sys.exit(%r) in a library", exit.code, exc_info=exit)
        code = 1
    process.exit_now(code)


def _quiet_progress_bars() -> None:
    """A server's output is a log: no "Loading weights" bars from transformers or diffusers in it."""
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


class ServerThread:
    """A server on its own event loop in a background thread (tests, benchmarks, notebooks).

    ``with ServerThread(config) as running: Client(running.address)...``; leaving the
    block drains with ``config.api.grace_s``.
    """

    def __init__(self, config: Settings, service_factory: ServiceFactory | None = None) -> None:
        self.config = config
        self.factory = service_factory
        self.server: LoraloomServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._bound: Future = Future()
        self._started: Future = Future()
        self._thread = threading.Thread(target=self._main, name="loraloom-server", daemon=True)
        self._done = None

    @property
    def address(self) -> str:
        return self.server.address

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.server = LoraloomServer(self.config, self.factory)
        self._done = asyncio.Event()
        try:
            await self.server.start()
            self._bound.set_result(self.server.port)
            await self.server.load()
        except BaseException as error:
            for future in (self._bound, self._started):
                if not future.done():
                    future.set_exception(error)
            await self.server.stop()
            return
        self._started.set_result(self.server.port)
        await self._done.wait()

    def start(self, timeout: float = 120.0, *, wait_ready: bool = True) -> ServerThread:
        """Start the thread; wait until ready (or only until the port is bound)."""
        self._thread.start()
        (self._started if wait_ready else self._bound).result(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        self._started.result(timeout)

    def call(self, coroutine, timeout: float | None = None):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def drain(self, grace_s: float | None = None, settle_s: float = 60.0) -> bool:
        """Drain (see ``LoraloomServer.drain``), then wait up to ``settle_s`` for the engine's step.

        In-process, the interpreter's teardown comes later and must not find the engine's
        worker inside a step (that aborts the process, see the module docstring).
        """
        finished = self.call(self.server.drain(grace_s))
        self.loop.call_soon_threadsafe(self._done.set)
        self._thread.join(30)
        deadline = time.monotonic() + settle_s
        while not self.server.settled and time.monotonic() < deadline:
            time.sleep(0.01)
        return finished

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive() and self.loop is not None and not self._done.is_set():
            self.drain(self.config.api.grace_s)
