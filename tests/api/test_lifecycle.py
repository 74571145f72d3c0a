"""Health transitions, UNAVAILABLE while starting and draining, and the error mapping of every type."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from adapters import errors
from server.api.errors import status_for
from server.client import Client
from server.client.errors import Unreachable
from server.wire import ANSWERED_KEY
from tests.api.helpers import StepSeam, micro_config

# The status each general typed error must reach a client as (the classes carry it in ``code``).
STATUS_BY_ERROR: tuple[tuple[type[errors.LoraloomError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
)


@pytest.mark.slow
def test_start_ready_drain_transitions(tmp_path):
    from server.api.app import ServerThread
    from server.bootstrap import build_service

    release = threading.Event()
    seam = StepSeam()

    def slow_factory(config):
        assert release.wait(60)
        return build_service(config, before_step=seam)

    running = ServerThread(micro_config(tmp_path, warmup=False), slow_factory).start(wait_ready=False)
    with Client(running.address, timeout=30) as client:
        assert client.health("") == "SERVING"
        assert client.health() == "NOT_SERVING"
        with pytest.raises(errors.Unavailable, match="starting") as starting:
            client.server_info()
        assert not isinstance(starting.value, Unreachable)
        patient: list[object] = []
        waiter = threading.Thread(target=lambda: patient.append(_info_with_retries(running.address)))
        waiter.start()
        time.sleep(0.5)
        release.set()
        running.wait_ready(120)
        waiter.join(60)
        assert len(patient) == 1 and patient[0].ready  # AsyncClient retried UNAVAILABLE until ready
        assert client.health() == "SERVING"
        assert client.server_info().ready

        seam.delay_s = 0.1
        outcome: list[object] = []
        inflight = threading.Thread(target=lambda: outcome.append(client.generate("x", steps=10, seed=1)))
        inflight.start()
        while not seam.calls:
            time.sleep(0.01)
        drained: list[bool] = []
        drainer = threading.Thread(target=lambda: drained.append(running.drain(10.0)))
        drainer.start()
        time.sleep(0.2)
        assert client.health() == "NOT_SERVING"
        with pytest.raises(errors.Unavailable, match="shutting down") as refused:
            client.generate("x", steps=1)
        assert not isinstance(refused.value, Unreachable)  # the server said so: no "is it running?" hint
        inflight.join(30)
        drainer.join(30)
        assert drained == [True]
        assert len(outcome) == 1 and outcome[0].images  # the call in flight finished
        with pytest.raises(Unreachable):
            client.health("", timeout=2)


@pytest.mark.slow
def test_drain_past_the_grace_period_cancels_and_stops(tmp_path):
    """Past the grace, the calls in flight (running and queued, unary and streaming) are answered
    UNAVAILABLE at once, the engine stops at its next step, and the stop takes under a second."""
    from server.api.app import ServerThread
    from server.bootstrap import build_service

    seam = StepSeam(delay_s=0.2)
    config = micro_config(tmp_path, warmup=False)
    running = ServerThread(config, lambda cfg: build_service(cfg, before_step=seam)).start()
    outcome: dict[str, object] = {}

    def long_request(name: str, **options) -> None:
        with Client(running.address, timeout=60) as client:
            try:
                outcome[name] = client.generate("x", steps=100, **options)
            except errors.LoraloomError as error:
                outcome[name] = error

    callers = [
        threading.Thread(target=long_request, args=("running",)),
        threading.Thread(target=long_request, args=("queued",), kwargs={"on_event": lambda event: None}),
    ]
    callers[0].start()
    while not seam.calls:
        time.sleep(0.01)
    callers[1].start()
    with Client(running.address, timeout=10) as client:
        while client.server_info().queue.queued < 1:
            time.sleep(0.01)
    started = time.monotonic()
    assert running.drain(0.5) is False  # the requests could not finish in time
    stopped_at = time.monotonic()
    for caller in callers:
        caller.join(30)
    assert stopped_at - started < 0.5 + 1.0
    assert set(outcome) == {"running", "queued"}
    for error in outcome.values():  # the server answered (not a dropped connection), and said why
        assert isinstance(error, errors.Unavailable) and not isinstance(error, Unreachable), error
        assert "shut down" in str(error)
    time.sleep(0.5)
    assert seam.steps_after(stopped_at) <= 1  # the engine stopped too


def test_a_library_exit_while_loading_fails_the_start(tmp_path, caplog):
    """``sys.exit(0)`` in a library while the model loads: a failed start (exit 1, logged), never exit 0."""
    import asyncio

    from server.api.app import ServerThread, StartupError, serve

    def exiting_factory(config):
        raise SystemExit(0)

    with pytest.raises(StartupError, match="SystemExit"):
        ServerThread(micro_config(tmp_path), exiting_factory).start(30)
    with caplog.at_level("ERROR", logger="loraloom.server"):
        assert asyncio.run(serve(micro_config(tmp_path), exiting_factory)) == 1
    assert any(
        "could not start: loading the model ended with SystemExit(0)" in r.message for r in caplog.records
    )


def _info_with_retries(address: str):
    import asyncio

    from server.client import AsyncClient

    async def main():
        async with AsyncClient(address, timeout=30, retries=12) as client:
            return await client.server_info()

    return asyncio.run(main())


@pytest.mark.parametrize(("kind", "code"), [(kind, code) for kind, code in STATUS_BY_ERROR])
def test_every_typed_error_has_its_status(kind, code):
    error = kind("what is wrong") if kind is not errors.ResourceExhausted else kind("full", 2.0)
    mapped, message, trailers = status_for(error)
    assert mapped == code
    assert message == str(error)
    if kind is errors.ResourceExhausted:
        expected = {"grpc-retry-pushback-ms": "2000", "retry-after-s": "2", ANSWERED_KEY: "1"}
        assert dict(trailers) == expected
    else:
        assert dict(trailers) == {ANSWERED_KEY: "1"}  # the server answered (not the transport)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.AdapterInvalid("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.AdapterIncompatible("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.LoraloomError("x"), grpc.StatusCode.INTERNAL),
        (KeyError("secret"), grpc.StatusCode.INTERNAL),
    ],
)
def test_subclasses_and_unexpected_errors(error, code):
    mapped, message, _ = status_for(error)
    assert mapped == code
    if code is grpc.StatusCode.INTERNAL:
        assert "secret" not in message and "incident" in message


def test_interceptor_over_a_real_channel():
    """Each typed error raised in a loraloom.v1 handler reaches a client as its status and typed error."""
    import asyncio

    from grpc import aio

    from server.api.errors import ErrorInterceptor
    from server.client.errors import ServerError, from_rpc_error

    raised = {kind.__name__: kind for kind, _ in STATUS_BY_ERROR} | {"KeyError": KeyError}

    async def behaviour(request: bytes, context):
        kind = raised[request.decode()]
        raise kind("full", 3.0) if kind is errors.ResourceExhausted else kind("why and what to do")

    async def streaming(request: bytes, context):
        yield b"first"
        raise errors.NotFound("gone mid-stream")

    handler = grpc.method_handlers_generic_handler(
        "loraloom.v1.Loraloom",
        {
            "Raise": grpc.unary_unary_rpc_method_handler(behaviour),
            "Stream": grpc.unary_stream_rpc_method_handler(streaming),
        },
    )
    outcomes: dict[str, object] = {}

    async def main() -> None:
        server = aio.server(interceptors=[ErrorInterceptor()])
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/loraloom.v1.Loraloom/Raise")
                for name in raised:
                    try:
                        await call(name.encode(), timeout=10)
                    except grpc.RpcError as error:
                        outcomes[name] = (error.code(), from_rpc_error(error))
                stream = channel.unary_stream("/loraloom.v1.Loraloom/Stream")(b"", timeout=10)
                received = []
                try:
                    async for item in stream:
                        received.append(item)
                except grpc.RpcError as error:
                    outcomes["stream"] = (received, error.code())
        finally:
            await server.stop(None)

    asyncio.run(main())
    for kind, code in STATUS_BY_ERROR:
        status, typed = outcomes[kind.__name__]
        assert status == code
        assert type(typed) is kind if kind is not errors.AdapterInvalid else isinstance(typed, kind)
    assert outcomes["ResourceExhausted"][1].retry_after_s == 3.0
    status, typed = outcomes["KeyError"]
    assert status == grpc.StatusCode.INTERNAL and isinstance(typed, ServerError)
    assert outcomes["stream"] == ([b"first"], grpc.StatusCode.NOT_FOUND)
