"""The server does what the .proto says, as a client written from the .proto alone reads it.

Each test is one place where the contract and the server used to disagree (a real server on
127.0.0.1:0, micro model): backend names, enum values, previews, the sampler that ran, the queue
counters, ``name@latest``, and what the .proto documents about trailers, request ids and streams.
"""

from __future__ import annotations

import io
import re
import time
import urllib.request

import grpc
import pytest
from PIL import Image as PILImage

from adapters import errors
from server.api import codegen
from server.api.pb.loraloom.v1 import generate_pb2, server_pb2, service_pb2_grpc
from server.client import Progress, Queued, ServerError
from tests.api.helpers import adapter_bytes, micro_config


def proto_text(name: str) -> str:
    """A .proto file's text, comments joined into one line each block (for phrase checks)."""
    (path,) = [path for path in codegen.proto_files() if path.name == name]
    return re.sub(r"\s*\n\s*(//)?\s*", " ", path.read_text())


def _stub(running):
    channel = grpc.insecure_channel(running.address)
    return channel, service_pb2_grpc.LoraloomStub(channel)


# ----------------------------------------------------------------------------- ServerInfo


def test_backend_is_a_listed_name_and_precision_has_its_own_field(client):
    info = client.server_info()
    assert (info.backend, info.precision, info.dtype) == ("torch", "fp32", "float32")
    listed = re.search(r'exactly one of ("[a-z]+"(?:, "[a-z]+")*,? or "[a-z]+")', proto_text("server.proto"))
    assert listed and '"torch"' in listed.group(1) and '"openvino"' in listed.group(1)


def test_an_openvino_server_reports_openvino_and_its_precision_apart(tmp_path):
    """It used to answer backend "openvino (fp32)", a value the .proto does not list."""
    pytest.importorskip("openvino")
    from server.api.app import ServerThread
    from server.bootstrap import build_service
    from server.client import Client

    config = micro_config(tmp_path / "home", backend="openvino", precision="fp32", warmup=False)
    with ServerThread(config, build_service) as running, Client(running.address, timeout=120) as client:
        info = client.server_info()
        assert (info.backend, info.precision) == ("openvino", "fp32")
        with grpc.insecure_channel(running.address) as channel:
            raw = service_pb2_grpc.LoraloomStub(channel).GetServerInfo(server_pb2.GetServerInfoRequest())
        assert (raw.backend, raw.precision) == ("openvino", "fp32")


def test_loraloom_info_shows_backend_precision_and_every_counter(running):
    from typer.testing import CliRunner

    from server.cli.main import app

    result = CliRunner().invoke(app, ["info", "--server", running.address])
    assert result.exit_code == 0, result.output
    assert "backend     torch (fp32) on cpu" in result.output
    assert all(word in result.output for word in ("failed", "cancelled", "past deadline", "invalid")), (
        result.output
    )


# ----------------------------------------------------------------------------- QueueStats


def test_queue_counts_clients_only_by_outcome(tmp_path):
    """The warm-up is not a client's request; INVALID_ARGUMENT refusals and deadlines have
    counters of their own (deadlines used to count as cancels)."""
    from server.api.app import ServerThread
    from server.bootstrap import build_service
    from server.client import Client
    from tests.api.helpers import StepSeam

    seam = StepSeam()
    config = micro_config(tmp_path / "home", warmup=True, metrics_port=0)
    with (
        ServerThread(config, lambda cfg: build_service(cfg, before_step=seam)) as running,
        Client(running.address, timeout=60) as client,
    ):
        first = client.server_info()
        assert first.ready and len(seam.calls) == 1  # the warm-up ran its one step ...
        queue = first.queue
        counters = ("completed", "failed", "cancelled", "rejected", "deadline_exceeded", "invalid")
        assert [getattr(queue, name) for name in counters] == [0] * 6  # ... and is not counted

        assert client.generate("x", steps=1).images
        with pytest.raises(errors.InvalidArgument):
            client.generate("x", steps=100_000)  # over limits.max_steps: refused by the engine
        with pytest.raises(errors.InvalidArgument):
            client.generate("x", steps=1, request_id="has space")  # refused by the conversion
        channel, stub = _stub(running)
        with channel, pytest.raises(grpc.RpcError):
            stub.Generate(generate_pb2.GenerateRequest(prompt="x", steps=1, format=9), timeout=60)

        seam.delay_s = 0.2
        with pytest.raises(errors.DeadlineExceeded):
            client.generate("x", steps=40, timeout=0.8)
        stream = client.generate_stream("x", steps=40)
        for event in stream:
            if isinstance(event, Progress):
                break
        stream.close()  # the client cancels
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            queue = client.server_info().queue
            if queue.cancelled and queue.deadline_exceeded and not queue.running:
                break
            time.sleep(0.1)
        seam.delay_s = 0.0
        assert [getattr(queue, name) for name in counters] == [1, 0, 1, 0, 1, 3]

        port = running.server.metrics.port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        for name, value in zip(counters, (1, 0, 1, 0, 1, 3), strict=True):
            assert f'loraloom_generations_total{{outcome="{name}"}} {value}.0' in text, name


# ----------------------------------------------------------------------------- requests


def test_an_unknown_image_format_is_invalid_argument_not_png(running):
    channel, stub = _stub(running)
    with channel:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(generate_pb2.GenerateRequest(prompt="x", steps=1, format=7), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ImageFormat 7" in caught.value.details()
        with pytest.raises(grpc.RpcError) as streamed:
            list(stub.GenerateStream(generate_pb2.GenerateRequest(prompt="x", steps=1, format=3), timeout=60))
        assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        jpeg = stub.Generate(generate_pb2.GenerateRequest(prompt="x", steps=1, format=2), timeout=60)
        assert jpeg.images[0].mime_type == "image/jpeg"
    assert "never falls back to PNG" in proto_text("generate.proto")


def test_previews_carry_the_image_seed_and_the_stated_size(client):
    events = list(client.generate_stream("a red circle", steps=2, seed=11, preview_every=1))
    previews = [event.preview for event in events if isinstance(event, Progress) and event.preview]
    assert len(previews) == 2
    for preview in previews:
        decoded = PILImage.open(io.BytesIO(preview.data))
        # 64 px on the longer side, or the image's own size (32 px on micro) when smaller
        assert (preview.width, preview.height) == decoded.size == (32, 32)
        assert preview.seed == 11 and preview.mime_type == "image/png"
    assert "64 pixels on its longer side" in proto_text("generate.proto")
    unseeded = list(client.generate_stream("a red circle", steps=1, preview_every=1))
    (preview,) = [event.preview for event in unseeded if isinstance(event, Progress)]
    assert preview.seed == unseeded[-1].result.images[0].seed  # the seed the server picked


def test_the_sampler_that_ran_is_named_and_reproduces_the_image(client):
    first = client.generate("a red circle", steps=3, seed=5)
    assert first.parameters.sampler == "dpmpp_2m"  # the micro base's DPM++ 2M, not "default"
    params = first.parameters
    again = client.generate(
        params.prompt, steps=params.steps, seed=params.seed, sampler=params.sampler, schedule=params.schedule
    )
    assert again.images[0].data == first.images[0].data
    asked = client.generate("a red circle", steps=3, seed=5, sampler="euler")
    assert asked.parameters.sampler == "euler"


# ----------------------------------------------------------------------------- name@latest


def test_name_at_latest_is_the_newest_version_everywhere(client, micro_shapes):
    client.upload_adapter(adapter_bytes(micro_shapes, seed=1), "newest")
    second = client.upload_adapter(adapter_bytes(micro_shapes, seed=2), "newest")
    assert client.get_adapter("newest@latest").version == second.version == 2
    styled = client.generate("x", steps=1, seed=1, adapters=["newest@latest:0.7"])
    assert [item.spec for item in styled.parameters.adapters] == ["newest@2:0.7"]
    assert client.load_adapter("newest@latest").version == 2
    client.load_adapter("newest@1")
    assert client.unload_adapter("newest@latest") is True
    assert [(item.name, item.version) for item in client.list_resident().adapters] == [("newest", 1)]
    # delete "name@latest" deletes that one version; plain "name" would delete them all
    assert [item.ref for item in client.delete_adapter("newest@latest")] == ["newest@2"]
    assert [item.ref for item in client.list_adapters(all_versions=True).adapters] == ["newest@1"]
    assert client.unload_adapter("nobody@latest") is False
    with pytest.raises(errors.InvalidArgument, match="latest"):
        client.set_alias("newest", "latest", 1)
    client.delete_adapter("newest")
    text = proto_text("generate.proto") + proto_text("adapters.proto")
    assert '"name@latest" (the newest ready version)' in text
    assert '"name@latest" deletes that one version' in text


# ----------------------------------------------------------------------------- documented rules


def test_the_proto_documents_every_trailer_the_server_sends():
    from server import wire

    text = proto_text("service.proto")
    for key in (wire.ANSWERED_KEY, wire.RETRY_PUSHBACK_KEY, wire.RETRY_AFTER_KEY):
        assert f'"{key}' in text, key
    assert "may be fractional" in text and "do not retry" in text


def test_the_proto_states_the_request_id_rule_the_server_applies(client):
    from server.api.convert import REQUEST_ID

    text = proto_text("generate.proto")
    assert "1 to 128 characters from A-Z, a-z, 0-9 and . _ : -" in text
    assert REQUEST_ID.pattern == r"[A-Za-z0-9._:-]{1,128}"  # what that sentence describes
    assert client.generate("x", steps=1, request_id="A.b_c:d-9").request_id == "A.b_c:d-9"
    with pytest.raises(errors.InvalidArgument, match="request_id"):
        client.generate("x", steps=1, request_id="x" * 129)


def test_an_error_may_follow_queued_events_in_a_stream(client, seam):
    seam.fail_with = RuntimeError("boom")
    seen: list = []
    with pytest.raises(ServerError) as caught:
        for event in client.generate_stream("x", steps=2):
            seen.append(event)
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert seen and isinstance(seen[0], Queued)
    assert "may instead end with an error status after any queued or progress event" in proto_text(
        "generate.proto"
    )
