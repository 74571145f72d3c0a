"""Every RPC against a real in-process server (micro model, SQLite store, 127.0.0.1:0)."""

from __future__ import annotations

import hashlib
import io
import re
import threading
import time

import grpc
import pytest
from PIL import Image as PILImage

from adapters import errors
from server.api.pb.loraloom.v1 import adapters_pb2, service_pb2_grpc
from server.client import Done, ImageReady, Progress, Queued, ServerError
from tests.api.helpers import adapter_bytes


def decode(data: bytes) -> PILImage.Image:
    image = PILImage.open(io.BytesIO(data))
    image.load()
    return image


def test_server_info_and_health(client):
    info = client.server_info()
    assert info.ready
    assert (info.base_model.name, info.base_model.architecture, info.base_model.resolution) == (
        "micro",
        "loraloom:micro",
        32,
    )
    assert len(info.base_model.fingerprint) == 64
    assert (info.backend, info.device, info.dtype) == ("torch", "cpu", "float32")
    assert info.limits.max_queue == 2 and info.limits.max_message_bytes == 64 << 20
    assert (info.limits.max_prompt_bytes, info.limits.max_rank, info.limits.max_abs_weight) == (
        16384,
        1024,
        10.0,
    )
    assert info.queue.completed == 0  # the warm-up ran (ready) but is not a client's request
    assert client.health("") == "SERVING"
    assert client.health() == "SERVING"


def test_generate_returns_a_png_and_is_reproducible(client):
    first = client.generate("a red circle", steps=2, seed=11)
    again = client.generate("a red circle", steps=2, seed=11)
    (image,) = first.images
    assert image.mime_type == "image/png" and (image.width, image.height, image.seed) == (32, 32, 11)
    assert decode(image.data).size == (32, 32)
    assert again.images[0].data == image.data
    assert first.timing.total_ms > 0 and first.blend_signature == ""
    # No id given: the server assigns one per request (it is in its log lines).
    assert re.fullmatch(r"[0-9a-f]{16}", first.request_id) and again.request_id != first.request_id
    assert client.generate("a red circle", steps=1, request_id="trace-7").request_id == "trace-7"
    for forged in ("abc\nlevel=ERROR", "x" * 129, "has space"):  # request ids go into log lines
        with pytest.raises(errors.InvalidArgument, match="request_id"):
            client.generate("a red circle", steps=1, request_id=forged)
    jpeg = client.generate("a red circle", steps=2, seed=11, image_format="jpeg", num_images=2)
    assert [item.seed for item in jpeg.images] == [11, 12]
    assert all(decode(item.data).format == "JPEG" for item in jpeg.images)


def test_samplers(client):
    euler = client.generate("a red circle", steps=2, seed=11, sampler="euler")
    default = client.generate("a red circle", steps=2, seed=11)
    assert euler.images[0].data != default.images[0].data
    with pytest.raises(errors.InvalidArgument, match="unknown scheduler"):
        client.generate("a red circle", steps=2, sampler="warp-drive")


def test_stream_order_previews_and_chunked_images(client):
    events = list(client.generate_stream("a red circle", steps=3, seed=11, preview_every=2, num_images=2))
    kinds = [type(event) for event in events]
    assert kinds == [Queued, Progress, Progress, Progress, ImageReady, ImageReady, Done]
    assert [(event.step, event.total_steps) for event in events[1:4]] == [(1, 3), (2, 3), (3, 3)]
    assert [event.preview is not None for event in events[1:4]] == [False, True, True]
    unary = client.generate("a red circle", steps=3, seed=11, num_images=2)
    streamed = events[-1].result.images
    assert events[-1].result.request_id and events[-1].result.request_id != unary.request_id
    assert [item.data for item in streamed] == [item.data for item in unary.images]
    assert len(streamed[0].data) > 700  # the server's chunk size: the image came in pieces


def test_stream_chunks_on_the_wire(running, client):
    from server.api.pb.loraloom.v1 import generate_pb2

    with grpc.insecure_channel(running.address) as channel:
        stub = service_pb2_grpc.LoraloomStub(channel)
        messages = list(stub.GenerateStream(generate_pb2.GenerateRequest(prompt="x", steps=1, seed=3)))
    chunks = [m.image_chunk for m in messages if m.WhichOneof("event") == "image_chunk"]
    assert len(chunks) >= 2 and all(len(chunk.data) <= 700 for chunk in chunks)
    assert [chunk.last for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert messages[-1].WhichOneof("event") == "done"


@pytest.mark.slow
def test_adapter_lifecycle(client, micro_shapes, tmp_path):
    data = adapter_bytes(micro_shapes, seed=5)
    path = tmp_path / "style.safetensors"
    path.write_bytes(data)
    created = client.upload_adapter(path, "style", description="a style", tags=["demo"], aliases=["stable"])
    assert (created.name, created.version, created.sha256) == ("style", 1, hashlib.sha256(data).hexdigest())
    assert created.architecture == "loraloom:micro" and created.rank == 4 and created.format == "canonical"
    assert created.aliases == ("stable",) and created.tags == ("demo",)
    second = client.upload_adapter(adapter_bytes(micro_shapes, seed=6), "style", chunk_size=4096)
    assert second.version == 2

    assert [item.ref for item in client.list_adapters().adapters] == ["style@2"]
    every = client.list_adapters(all_versions=True, page_size=1)
    assert [item.ref for item in every.adapters] == ["style@1"] and every.next_page_token
    paged = client.iter_adapters(all_versions=True, page_size=1)
    assert [item.ref for item in paged] == ["style@1", "style@2"]
    assert client.list_adapters(tag="demo", all_versions=True).adapters[0].ref == "style@1"
    assert client.get_adapter("style@stable").version == 1
    assert client.get_adapter("style").version == 2
    assert client.set_alias("style", "stable", 2).aliases == ("stable",)

    base = client.generate("a red circle", steps=2, seed=4)
    styled = client.generate("a red circle", steps=2, seed=4, adapters=["style@stable:0.8"])
    assert styled.blend_signature and styled.images[0].data != base.images[0].data
    (applied,) = styled.parameters.adapters
    assert (applied.spec, applied.sha256) == ("style@2:0.8", second.sha256)
    assert (styled.parameters.steps, styled.parameters.seed, styled.parameters.width) == (2, 4, 32)
    tagged = client.generate("a red circle <lora:style@2:0.8>", steps=2, seed=4)
    assert tagged.images[0].data == styled.images[0].data and tagged.parameters.prompt == "a red circle"
    assert client.generate("a red circle", steps=2, seed=4).images[0].data == base.images[0].data

    pinned = client.load_adapter("style@1", pin=True)
    assert (pinned.name, pinned.version, pinned.pinned) == ("style", 1, True)
    resident = client.list_resident()
    assert {(item.version, item.pinned) for item in resident.adapters} == {(1, True), (2, False)}
    assert resident.cache.entries == 2 and resident.cache.used_bytes > 0 and resident.cache.swaps >= 1
    assert client.unload_adapter("style@1") is True
    assert client.unload_adapter("style@1") is False

    assert [item.ref for item in client.delete_adapter("style@1")] == ["style@1"]
    assert [item.ref for item in client.delete_adapter("style")] == ["style@2"]
    with pytest.raises(errors.NotFound):
        client.get_adapter("style")
    assert client.list_resident().adapters == []


def test_invalid_arguments(client, micro_shapes):
    with pytest.raises(errors.InvalidArgument, match="prompt is empty"):
        client.generate("   ")
    with pytest.raises(errors.InvalidArgument, match="steps"):
        client.generate("x", steps=1000)
    with pytest.raises(errors.InvalidArgument, match="sha256 mismatch"):
        _upload_raw(client, "bad-hash", adapter_bytes(micro_shapes), sha256="0" * 64)
    with pytest.raises(errors.InvalidArgument):
        client.upload_adapter(b"not a safetensors file at all", "garbage")
    with pytest.raises(errors.InvalidArgument, match="name"):
        client.upload_adapter(adapter_bytes(micro_shapes), "Bad Name!")
    with pytest.raises(errors.InvalidArgument, match="UploadMetadata first"):
        _upload_messages(client, [adapters_pb2.UploadAdapterRequest(chunk=b"abc")])
    assert client.list_adapters(all_versions=True).adapters == []


def test_not_found(client):
    with pytest.raises(errors.NotFound):
        client.get_adapter("nobody")
    with pytest.raises(errors.NotFound):
        client.generate("x", steps=1, adapters=["nobody:0.5"])
    with pytest.raises(errors.NotFound):
        client.delete_adapter("nobody@3")
    with pytest.raises(errors.NotFound):
        client.load_adapter("nobody")


def test_incompatible_adapter_is_failed_precondition(client, tiny_pipeline):
    from server.models.shapes import module_shapes

    data = adapter_bytes(module_shapes(tiny_pipeline), architecture="loraloom:tiny")
    with pytest.raises(errors.FailedPrecondition):
        client.upload_adapter(data, "made-for-tiny")
    assert client.list_adapters(all_versions=True).adapters == []


def test_unary_image_over_the_message_limit_is_resource_exhausted_not_to_retry(running, client):
    """RESOURCE_EXHAUSTED, as the .proto says and as gRPC answers for an oversized message itself,
    with a negative pushback (gRFC A6: do not retry) and a message saying what to do instead."""
    from server.api.pb.loraloom.v1 import generate_pb2
    from server.client import Client

    servicer = running.server.servicer
    servicer.config = servicer.config.replace(max_message_mb=0)  # a limit no image fits (read per call)
    try:
        with pytest.raises(errors.ResourceExhausted, match="GenerateStream.*fewer or smaller") as caught:
            client.generate("x", steps=1)
        assert caught.value.retry_after_s < 0
        with Client(running.address, timeout=60, retries=3) as retrying:
            started = time.monotonic()
            with pytest.raises(errors.ResourceExhausted):
                retrying.generate("x", steps=1)
            assert time.monotonic() - started < 5  # not retried (3 retries would each wait)
        with grpc.insecure_channel(running.address) as channel:
            stub = service_pb2_grpc.LoraloomStub(channel)
            with pytest.raises(grpc.RpcError) as raw:
                stub.Generate(generate_pb2.GenerateRequest(prompt="x", steps=1), timeout=60)
        assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(raw.value.trailing_metadata())
        assert trailers["grpc-retry-pushback-ms"] == "-1" and "retry-after-s" not in trailers
        assert trailers["loraloom-answered"] == "1"
    finally:
        servicer.config = servicer.config.replace(max_message_mb=64)


def test_unexpected_failure_is_internal_without_details(client, seam):
    seam.fail_with = RuntimeError("secret internal detail")
    with pytest.raises(ServerError) as caught:
        client.generate("x", steps=2)
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert "secret" not in str(caught.value) and "incident" in str(caught.value)


def test_cancel_stops_within_one_step_and_frees_the_slot(client, seam):
    seam.delay_s = 0.2
    stream = client.generate_stream("x", steps=40, seed=1)
    for event in stream:
        if isinstance(event, Progress) and event.step == 2:
            break
    cancelled_at = time.monotonic()
    stream.close()  # cancels the call
    time.sleep(1.0)
    assert seam.steps_after(cancelled_at) <= 1
    seam.delay_s = 0.0
    assert client.generate("x", steps=1).images  # the worker is free again


def test_deadline_stops_within_one_step(client, seam):
    seam.delay_s = 0.2
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        client.generate("x", steps=40, timeout=1.0)
    deadline = started + 1.0
    time.sleep(0.8)
    assert seam.steps_after(deadline) <= 1
    assert len(seam.calls) < 10


def test_full_queue_is_resource_exhausted_with_a_retry_hint(client, seam, running):
    seam.delay_s = 0.2
    results: list[object] = []

    def one() -> None:
        try:
            results.append(client.generate("x", steps=10, seed=1))  # >= 2 s each
        except errors.LoraloomError as error:
            results.append(error)

    workers = [threading.Thread(target=one) for _ in range(3)]  # 1 running + 2 queued (max_queue=2)
    for worker in workers:
        worker.start()
        time.sleep(0.3)
    with pytest.raises(errors.ResourceExhausted, match="queue is full") as caught:
        client.generate("x", steps=5)
    assert caught.value.retry_after_s >= 0.5
    for worker in workers:
        worker.join(60)
    assert all(not isinstance(item, Exception) for item in results), results


def test_upload_of_a_large_adapter_in_chunks(client, micro_shapes):
    """~50 MB in 1 MiB chunks reaches the store whole (its sha256 checks out), and is then refused:
    rank 2900 on 32-wide layers is only memory (the micro model cannot hold a legitimate 50 MB LoRA)."""
    data = adapter_bytes(micro_shapes, seed=9, rank=2900)
    assert len(data) > 48 << 20
    with pytest.raises(errors.InvalidArgument, match="rank 2900"):
        client.upload_adapter(data, "large", chunk_size=1 << 20)
    assert [a.name for a in client.list_adapters().adapters if a.name == "large"] == []
    small = adapter_bytes(micro_shapes, seed=9, rank=8)
    created = client.upload_adapter(small, "large", chunk_size=1 << 10)
    assert created.size_bytes == len(small) and created.sha256 == hashlib.sha256(small).hexdigest()
    client.delete_adapter("large")


def test_upload_aborted_mid_stream_leaves_nothing_visible(running, client, micro_shapes):
    data = adapter_bytes(micro_shapes, seed=3)
    sent = threading.Event()

    def messages():
        meta = adapters_pb2.UploadMetadata(
            name="aborted", sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
        )
        yield adapters_pb2.UploadAdapterRequest(metadata=meta)
        yield adapters_pb2.UploadAdapterRequest(chunk=data[:1000])
        sent.set()
        time.sleep(30)  # the client gives up long before this

    with grpc.insecure_channel(running.address) as channel:
        call = service_pb2_grpc.LoraloomStub(channel).UploadAdapter.future(messages())
        assert sent.wait(10)
        time.sleep(0.5)
        call.cancel()
    staging = running.server.config.store.home / "store" / "staging"
    deadline = time.monotonic() + 10
    while any(staging.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(staging.iterdir())
    assert client.list_adapters(all_versions=True).adapters == []
    with pytest.raises(errors.NotFound):
        client.get_adapter("aborted")


def test_short_upload_is_refused(client, micro_shapes):
    data = adapter_bytes(micro_shapes, seed=3)
    with pytest.raises(errors.InvalidArgument, match="ended after"):
        _upload_raw(client, "short", data, size_bytes=len(data) + 10)
    assert client.list_adapters(all_versions=True).adapters == []


def test_reflection_lists_the_services(running):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(running.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request])))
        names = {service.name for service in response.list_services_response.service}
        assert {"loraloom.v1.Loraloom", "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="loraloom.v1.Loraloom")
        (response,) = list(stub.ServerReflectionInfo(iter([request])))
        assert response.file_descriptor_response.file_descriptor_proto


def _upload_raw(client, name: str, data: bytes, *, sha256: str | None = None, size_bytes: int | None = None):
    meta = adapters_pb2.UploadMetadata(
        name=name,
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        size_bytes=len(data) if size_bytes is None else size_bytes,
    )
    parts = [adapters_pb2.UploadAdapterRequest(metadata=meta)]
    step = 65536
    parts += [adapters_pb2.UploadAdapterRequest(chunk=data[i : i + step]) for i in range(0, len(data), step)]
    return _upload_messages(client, parts)


def _upload_messages(client, parts):
    from server.client.errors import from_rpc_error

    try:
        return client._stub.UploadAdapter(iter(parts), timeout=30)
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None


def test_async_client(running, micro_shapes):
    import asyncio

    from server.client import AsyncClient

    async def main():
        async with AsyncClient(running.address, timeout=60) as client:
            assert await client.health() == "SERVING"
            info = await client.server_info()
            result = await client.generate("a red circle", steps=2, seed=11)
            seen = []
            streamed = await client.generate("a red circle", steps=2, seed=11, on_event=seen.append)
            created = await client.upload_adapter(adapter_bytes(micro_shapes, seed=8), "async-style")
            page = await client.list_adapters()
            resident = await client.load_adapter("async-style")
            listing = await client.list_resident()
            unloaded = await client.unload_adapter("async-style")
            deleted = await client.delete_adapter("async-style")
            try:
                await client.get_adapter("async-style")
            except errors.NotFound as error:
                missing = error
            return info, result, seen, streamed, created, page, resident, listing, unloaded, deleted, missing

    info, result, seen, streamed, created, page, resident, listing, unloaded, deleted, missing = asyncio.run(
        main()
    )
    assert info.base_model.name == "micro"
    assert streamed.images[0].data == result.images[0].data
    assert [type(event) for event in seen] == [Queued, Progress, Progress, ImageReady, Done]
    assert created.ref == "async-style@1" and [item.ref for item in page.adapters] == ["async-style@1"]
    assert resident.version == 1 and [item.name for item in listing.adapters] == ["async-style"]
    assert unloaded is True and [item.ref for item in deleted] == ["async-style@1"]
    assert isinstance(missing, errors.NotFound)


def test_reflection_alone_is_enough_to_call_generate(running):
    """A client without the stubs: descriptors from reflection, dynamic messages, a raw call."""
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(running.address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName("loraloom.v1.Loraloom").methods_by_name["Generate"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            "/loraloom.v1.Loraloom/Generate",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        response = call(request_class(prompt="a red circle", steps=1, seed=5), timeout=60)
    assert decode(response.images[0].data).size == (32, 32)


def test_too_many_concurrent_uploads_is_resource_exhausted(running, client, micro_shapes):
    from server.service import MAX_UPLOADS

    data = adapter_bytes(micro_shapes, seed=4)
    release = threading.Event()

    def stalled():
        meta = adapters_pb2.UploadMetadata(
            name="stalled", sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
        )
        yield adapters_pb2.UploadAdapterRequest(metadata=meta)
        yield adapters_pb2.UploadAdapterRequest(chunk=data[:100])
        release.wait(30)

    with grpc.insecure_channel(running.address) as channel:
        stub = service_pb2_grpc.LoraloomStub(channel)
        calls = [stub.UploadAdapter.future(stalled()) for _ in range(MAX_UPLOADS)]
        deadline = time.monotonic() + 20
        while running.server.lifecycle.inflight < MAX_UPLOADS and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        with pytest.raises(errors.ResourceExhausted, match="uploads are already in progress"):
            client.upload_adapter(data, "one-too-many")
        for call in calls:
            call.cancel()
        release.set()
    deadline = time.monotonic() + 20
    while True:  # the slots come back once the store has dropped the aborted uploads
        try:
            assert client.upload_adapter(data, "after-the-rush").version == 1
            break
        except errors.ResourceExhausted:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    client.delete_adapter("after-the-rush")
    assert client.list_adapters(all_versions=True).adapters == []


def test_a_resident_blend_generate_reads_the_store_once_then_never(running, client, micro_shapes):
    """Through the real server: a Generate naming a resident two-adapter blend issues at most one
    SQL statement (resolving both refs), and none while the resolution is cached."""
    from sqlalchemy import event

    client.upload_adapter(adapter_bytes(micro_shapes, seed=21), "counted-a")
    client.upload_adapter(adapter_bytes(micro_shapes, seed=22), "counted-b")
    blend = ["counted-a:0.6", "counted-b@1:0.4"]
    client.generate("x", steps=1, seed=1, adapters=blend)  # loads both: they are resident now
    service = running.server.service
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_rest) -> None:
        statements.append(statement)

    event.listen(service.store.engine, "before_cursor_execute", record)
    try:
        service.engine.resolver.invalidate()
        client.generate("x", steps=1, seed=2, adapters=blend)
        assert len(statements) <= 1, statements
        statements.clear()
        client.generate("x", steps=1, seed=3, adapters=blend)
        assert statements == []
    finally:
        event.remove(service.store.engine, "before_cursor_execute", record)


def test_a_ties_merge_runs_end_to_end(client, micro_shapes):
    client.upload_adapter(adapter_bytes(micro_shapes, seed=23), "merge-a")
    client.upload_adapter(adapter_bytes(micro_shapes, seed=24), "merge-b")
    blend = ["merge-a:1", "merge-b:1"]
    linear = client.generate("x", steps=1, seed=4, adapters=blend)
    ties = client.generate("x", steps=1, seed=4, adapters=blend, merge="ties", density=0.3)
    assert linear.parameters.merge == "linear" and ties.parameters.merge == "ties"
    assert abs(ties.parameters.density - 0.3) < 1e-6
    assert ties.blend_signature != linear.blend_signature
    with pytest.raises(errors.InvalidArgument, match="merge"):
        client.generate("x", steps=1, adapters=blend, merge="ties", density=2.0)
