"""server.client against scripted responses (grpcio-testing channels): errors, chunked images, uploads."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import grpc_testing
import pytest

from adapters import errors
from server.api.pb.loraloom.v1 import adapters_pb2, generate_pb2, service_pb2
from server.client import AdapterSpec, Client, Done, ImageReady, Progress, Queued, ServerError

SERVICE = service_pb2.DESCRIPTOR.services_by_name["Loraloom"]


def method(name: str):
    return SERVICE.methods_by_name[name]


@pytest.fixture()
def scripted():
    channel = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
    client = Client(channel=channel, timeout=10)
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield channel, client, pool


def test_stream_events_in_order_and_chunked_images_reassembled(scripted):
    channel, client, pool = scripted
    big = bytes(range(256)) * 40  # 10240 bytes in three chunks
    small = b"\x89PNG-small"
    stream = client.generate_stream("a red circle", adapters=["style@2:0.5"], seed=7)
    future = pool.submit(lambda: list(stream))
    _, request, rpc = channel.take_unary_stream(method("GenerateStream"))
    assert request.prompt == "a red circle"
    assert [(spec.ref, spec.weight) for spec in request.adapters] == [("style@2", 0.5)]
    assert request.seed == 7
    send = rpc.send_response
    send(generate_pb2.GenerateStreamResponse(queued=generate_pb2.QueuedEvent(position=2)))
    preview = generate_pb2.Image(data=b"p", mime_type="image/png", width=8, height=8)
    send(
        generate_pb2.GenerateStreamResponse(
            progress=generate_pb2.ProgressEvent(step=1, total_steps=2, preview=preview)
        )
    )
    send(generate_pb2.GenerateStreamResponse(progress=generate_pb2.ProgressEvent(step=2, total_steps=2)))
    for offset, last in ((0, False), (4096, False), (8192, True)):
        chunk = generate_pb2.ImageChunk(
            index=0,
            offset=offset,
            data=big[offset : offset + 4096],
            total_size=len(big),
            last=last,
            mime_type="image/png",
            width=64,
            height=64,
            seed=7,
        )
        send(generate_pb2.GenerateStreamResponse(image_chunk=chunk))
    one = generate_pb2.ImageChunk(index=1, data=small, total_size=len(small), last=True, seed=8)
    send(generate_pb2.GenerateStreamResponse(image_chunk=one))
    done = generate_pb2.DoneEvent(timing=generate_pb2.Timing(total_ms=12.5), blend_signature="sig")
    send(generate_pb2.GenerateStreamResponse(done=done))
    rpc.terminate((), grpc.StatusCode.OK, "")
    events = future.result(timeout=10)
    assert [type(event) for event in events] == [Queued, Progress, Progress, ImageReady, ImageReady, Done]
    assert events[0].position == 2
    assert events[1].preview.data == b"p" and events[2].preview is None
    assert events[3].image.data == big and (events[3].image.width, events[3].image.seed) == (64, 7)
    result = events[-1].result
    assert [image.data for image in result.images] == [big, small]
    assert result.timing.total_ms == 12.5 and result.blend_signature == "sig"


def test_stream_with_a_gap_between_chunks_is_refused(scripted):
    channel, client, pool = scripted
    future = pool.submit(lambda: list(client.generate_stream("x")))
    _, _, rpc = channel.take_unary_stream(method("GenerateStream"))
    rpc.send_response(
        generate_pb2.GenerateStreamResponse(image_chunk=generate_pb2.ImageChunk(index=0, data=b"ab"))
    )
    rpc.send_response(
        generate_pb2.GenerateStreamResponse(image_chunk=generate_pb2.ImageChunk(index=0, offset=5, data=b"c"))
    )
    rpc.terminate((), grpc.StatusCode.OK, "")
    with pytest.raises(ValueError, match="offset 5"):
        future.result(timeout=10)


def test_stream_error_after_progress_raises_typed_error(scripted):
    channel, client, pool = scripted
    seen = []
    future = pool.submit(lambda: client.generate("x", on_event=seen.append))
    _, _, rpc = channel.take_unary_stream(method("GenerateStream"))
    rpc.send_response(generate_pb2.GenerateStreamResponse(progress=generate_pb2.ProgressEvent(step=1)))
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:  # the testing channel drops unread messages on error
        time.sleep(0.01)
    rpc.terminate((), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed at step 1")
    with pytest.raises(errors.DeadlineExceeded, match="step 1"):
        future.result(timeout=10)
    assert seen == [Progress(step=1, total_steps=0)]


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.CANCELLED, errors.Cancelled),
        (grpc.StatusCode.INTERNAL, ServerError),
        (grpc.StatusCode.UNIMPLEMENTED, ServerError),
    ],
)
def test_status_codes_become_typed_errors(scripted, code, kind):
    channel, client, pool = scripted
    future = pool.submit(client.get_adapter, "missing")
    _, request, rpc = channel.take_unary_unary(method("GetAdapter"))
    assert request.ref == "missing"
    rpc.terminate(adapters_pb2.AdapterVersion(), (), code, "what went wrong")
    with pytest.raises(kind, match="what went wrong") as caught:
        future.result(timeout=10)
    if kind is ServerError:
        assert caught.value.code == code


def test_resource_exhausted_carries_the_retry_hint(scripted):
    channel, client, pool = scripted
    future = pool.submit(client.generate, "x")
    _, _, rpc = channel.take_unary_unary(method("Generate"))
    trailers = (("grpc-retry-pushback-ms", "2500"), ("retry-after-s", "2.5"))
    rpc.terminate(generate_pb2.GenerateResponse(), trailers, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    with pytest.raises(errors.ResourceExhausted) as caught:
        future.result(timeout=10)
    assert caught.value.retry_after_s == 2.5


def test_retries_follow_the_servers_hint():
    channel = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
    client = Client(channel=channel, timeout=10, retries=2)
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(client.get_adapter, "style")
        started = time.monotonic()
        _, _, rpc = channel.take_unary_unary(method("GetAdapter"))
        pushback = (("grpc-retry-pushback-ms", "200"),)
        rpc.terminate(adapters_pb2.AdapterVersion(), pushback, grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
        _, _, rpc = channel.take_unary_unary(method("GetAdapter"))
        waited = time.monotonic() - started
        rpc.terminate(adapters_pb2.AdapterVersion(), (), grpc.StatusCode.UNAVAILABLE, "draining")
        _, _, rpc = channel.take_unary_unary(method("GetAdapter"))
        rpc.terminate(adapters_pb2.AdapterVersion(name="style", version=3), (), grpc.StatusCode.OK, "")
        assert future.result(timeout=10).ref == "style@3"
    assert waited >= 0.2


def test_retries_give_up_and_skip_other_errors(scripted):
    channel, _, pool = scripted
    client = Client(channel=channel, timeout=10, retries=1)
    future = pool.submit(client.get_adapter, "style")
    for _ in range(2):
        _, _, rpc = channel.take_unary_unary(method("GetAdapter"))
        rpc.terminate(adapters_pb2.AdapterVersion(), (), grpc.StatusCode.UNAVAILABLE, "draining")
    with pytest.raises(errors.Unavailable):
        future.result(timeout=10)
    future = pool.submit(client.get_adapter, "style")
    _, _, rpc = channel.take_unary_unary(method("GetAdapter"))
    rpc.terminate(adapters_pb2.AdapterVersion(), (), grpc.StatusCode.NOT_FOUND, "no such adapter")
    with pytest.raises(errors.NotFound):
        future.result(timeout=10)


def test_upload_sends_metadata_then_chunks_with_the_sha256(scripted, tmp_path):
    channel, client, pool = scripted
    data = bytes(range(256)) * 1000
    path = tmp_path / "style.safetensors"
    path.write_bytes(data)
    future = pool.submit(client.upload_adapter, path, "style", aliases=["stable"], chunk_size=100_000)
    _, rpc = channel.take_stream_unary(method("UploadAdapter"))
    first = rpc.take_request()
    assert first.WhichOneof("part") == "metadata"
    meta = first.metadata
    assert (meta.name, meta.size_bytes, list(meta.aliases)) == ("style", len(data), ["stable"])
    assert meta.sha256 == hashlib.sha256(data).hexdigest()
    received = bytearray()
    chunks = 0
    while len(received) < len(data):
        part = rpc.take_request()
        assert part.WhichOneof("part") == "chunk"
        received += part.chunk
        chunks += 1
    rpc.requests_closed()
    assert bytes(received) == data and chunks == 3
    reply = adapters_pb2.AdapterVersion(name="style", version=1, sha256=meta.sha256, aliases=["stable"])
    rpc.terminate(reply, (), grpc.StatusCode.OK, "")
    info = future.result(timeout=10)
    assert (info.ref, info.aliases) == ("style@1", ("stable",))


@pytest.mark.parametrize(
    ("text", "ref", "weight"),
    [
        ("style", "style", 1.0),
        ("style:0.8", "style", 0.8),
        ("style@3", "style@3", 1.0),
        ("style@stable:-0.5", "style@stable", -0.5),
    ],
)
def test_adapter_spec_parse(text, ref, weight):
    assert AdapterSpec.parse(text) == AdapterSpec(ref, weight)


@pytest.mark.parametrize("text", ["style:heavy", ":0.5", "", "style:0.5:0.3"])
def test_adapter_spec_parse_rejects_nonsense(text):
    with pytest.raises(errors.InvalidArgument):
        AdapterSpec.parse(text)


def test_client_imports_no_torch():
    code = (
        "import sys, server.client, server.client.aio; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'safetensors') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(_repo_root()))


def _repo_root():
    from server.api.codegen import REPO_ROOT

    return REPO_ROOT
