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
from server.client.convert import adapter_specs

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
        (grpc.StatusCode.DATA_LOSS, errors.DataLoss),
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


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("style:0.8:0.5", (0.8, 0.5)),  # A1111: text encoder, UNet
        ("style@2:te=0:unet=0.7", (0.0, 0.7)),
        ("style:unet=0.5", (1.0, 0.5)),
        ("style:te=0.5", (0.5, 0.5)),  # A1111: the UNet takes the text encoder's weight
    ],
)
def test_adapter_spec_parse_per_part_weights(text, parts):
    spec = AdapterSpec.parse(text)
    assert spec.parts == parts
    (message,) = adapter_specs([spec])
    if parts[0] == parts[1]:
        assert not message.HasField("text_encoder_weight") and message.weight == pytest.approx(parts[0])
    else:
        assert (message.text_encoder_weight, message.unet_weight) == pytest.approx(parts)


@pytest.mark.parametrize("text", ["style:heavy", ":0.5", "", "style:0.5:0.3:0.1", "style:dyn=4"])
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


def test_generate_sends_the_merge_and_reads_back_what_ran(scripted):
    channel, client, pool = scripted
    future = pool.submit(
        client.generate, "x", adapters=["a", "b:0.5"], merge="dare_ties", density=0.3, merge_seed=5
    )
    _, request, rpc = channel.take_unary_unary(method("Generate"))
    assert request.HasField("merge")
    assert (request.merge.method, request.merge.seed) == ("dare_ties", 5)
    assert request.merge.density == pytest.approx(0.3)
    ran = generate_pb2.BlendMerge(method="dare_ties", density=0.3, seed=5)
    reply = generate_pb2.GenerateResponse(
        blend_signature="merged", parameters=generate_pb2.GenerationParameters(seed=1, merge=ran)
    )
    rpc.terminate(reply, (), grpc.StatusCode.OK, "")
    params = future.result(timeout=10).parameters
    assert (params.merge, params.merge_seed) == ("dare_ties", 5)
    assert params.density == pytest.approx(0.3)


def test_stream_sends_the_merge_and_done_reads_it_back(scripted):
    channel, client, pool = scripted
    future = pool.submit(lambda: list(client.generate_stream("x", adapters=["a"], merge="ties")))
    _, request, rpc = channel.take_unary_stream(method("GenerateStream"))
    assert request.merge.method == "ties"
    assert request.merge.density == 0.0 and not request.merge.HasField("seed")  # the server's defaults
    ran = generate_pb2.GenerationParameters(merge=generate_pb2.BlendMerge(method="ties", density=0.5))
    rpc.send_response(generate_pb2.GenerateStreamResponse(done=generate_pb2.DoneEvent(parameters=ran)))
    rpc.terminate((), grpc.StatusCode.OK, "")
    params = future.result(timeout=10)[-1].result.parameters
    assert (params.merge, params.density, params.merge_seed) == ("ties", 0.5, None)


def test_linear_blend_sends_no_merge_and_an_old_servers_reply_reads_as_linear(scripted):
    channel, client, pool = scripted
    future = pool.submit(client.generate, "x", adapters=["a"])
    _, request, rpc = channel.take_unary_unary(method("Generate"))
    assert not request.HasField("merge")  # the same bytes as before merges existed
    rpc.terminate(generate_pb2.GenerateResponse(), (), grpc.StatusCode.OK, "")
    params = future.result(timeout=10).parameters
    assert (params.merge, params.density, params.merge_seed) == ("linear", 0.0, None)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"merge": "linear"}, None),
        ({"merge": ""}, None),
        ({"merge": "linear", "density": 0.2}, ("linear", 0.2, None)),
        ({"merge": "dare_linear"}, ("dare_linear", 0.0, None)),
        ({"merge": "dare_linear", "merge_seed": 0}, ("dare_linear", 0.0, 0)),
        ({"merge": "Bogus", "density": 7.0}, ("Bogus", 7.0, None)),  # the server refuses it
    ],
)
def test_blend_merge_message(options, expected):
    from server.client import convert

    request = convert.generate_request("x", **options)
    if expected is None:
        assert not request.HasField("merge")
        return
    merge = request.merge
    seed = merge.seed if merge.HasField("seed") else None
    assert (merge.method, merge.density, seed) == pytest.approx(expected)


def test_negative_merge_seed_is_refused_before_any_call():
    from server.client import convert

    with pytest.raises(errors.InvalidArgument, match="merge seed"):
        convert.generate_request("x", merge="dare_ties", merge_seed=-1)


def test_async_client_sends_the_merge_and_reads_it_back():
    import asyncio

    from server.api.pb.loraloom.v1 import service_pb2_grpc
    from server.client import AsyncClient

    class Echo(service_pb2_grpc.LoraloomServicer):
        async def Generate(self, request, context):
            return generate_pb2.GenerateResponse(
                parameters=generate_pb2.GenerationParameters(merge=request.merge)
            )

        async def GenerateStream(self, request, context):
            done = generate_pb2.DoneEvent(parameters=generate_pb2.GenerationParameters(merge=request.merge))
            yield generate_pb2.GenerateStreamResponse(done=done)

    async def run():
        server = grpc.aio.server()
        service_pb2_grpc.add_LoraloomServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with AsyncClient(f"127.0.0.1:{port}", timeout=10) as client:
                unary = await client.generate("x", merge="ties", density=0.25)
                streamed = await client.generate(
                    "x", merge="dare_linear", merge_seed=9, on_event=lambda event: None
                )
        finally:
            await server.stop(None)
        return unary.parameters, streamed.parameters

    unary, streamed = asyncio.run(run())
    assert (unary.merge, unary.density, unary.merge_seed) == ("ties", 0.25, None)
    assert (streamed.merge, streamed.density, streamed.merge_seed) == ("dare_linear", 0.0, 9)


def test_cli_generate_sends_merge_and_density(scripted, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from server.cli import main as cli

    channel, client, pool = scripted
    monkeypatch.setattr(cli, "_client", lambda server, timeout: client)
    argv = ["generate", "x", "-a", "a", "-a", "b", "--merge", "ties", "--density", "0.3", "--no-progress"]
    future = pool.submit(CliRunner().invoke, cli.app, [*argv, "--output", str(tmp_path / "out.png")])
    _, request, rpc = channel.take_unary_stream(method("GenerateStream"))
    assert request.merge.method == "ties" and request.merge.density == pytest.approx(0.3)
    assert not request.merge.HasField("seed")
    ran = generate_pb2.GenerationParameters(
        adapters=[generate_pb2.AppliedAdapter(name="a", version=1, weight=1.0)],
        merge=generate_pb2.BlendMerge(method="ties", density=0.3),
    )
    rpc.send_response(generate_pb2.GenerateStreamResponse(done=generate_pb2.DoneEvent(parameters=ran)))
    rpc.terminate((), grpc.StatusCode.OK, "")
    result = future.result(timeout=10)
    assert result.exit_code == 0, result.output
    assert "--adapter a@1:1 --merge ties --density 0.3" in result.output


@pytest.mark.parametrize("density", ["0", "1.5", "-0.2"])
def test_cli_refuses_a_density_outside_0_1(density):
    from typer.testing import CliRunner

    from server.cli.main import app

    result = CliRunner().invoke(app, ["generate", "x", "--density", density, "--server", "127.0.0.1:1"])
    assert result.exit_code == 2 and "(0, 1]" in result.output


def test_merge_methods_match_the_servers():
    from typing import get_args

    from adapters.blend import MERGE_METHODS
    from server.cli.main import MergeMethod
    from server.client.types import MERGE_METHODS as CLIENT_METHODS

    assert CLIENT_METHODS == MERGE_METHODS == get_args(MergeMethod)
