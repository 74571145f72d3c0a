"""The loraloom.v1.Loraloom servicer: converts protobuf to plain calls on ``LoraloomService`` and back.

No business logic lives here. Blocking work goes to threads (``asyncio.to_thread``) or
to the scheduler's worker (``asyncio.wrap_future``), never onto the event loop.
Errors propagate as ``adapters.errors`` types; ``server.api.errors`` maps them.
"""

from __future__ import annotations

import asyncio
import threading
import time

from grpc import aio

from adapters.errors import InvalidArgument, ResourceExhausted
from server.api import convert
from server.api.pb.loraloom.v1 import adapters_pb2, generate_pb2, server_pb2, service_pb2_grpc
from server.engine.types import Progress
from server.service import LoraloomService, encode_image
from server.settings import Settings
from server.wire import DO_NOT_RETRY

MESSAGE_OVERHEAD_BYTES = 64 * 1024


class LoraloomServicer(service_pb2_grpc.LoraloomServicer):
    """``service`` may be attached after the server starts (while the base model loads);
    ``GateInterceptor`` refuses calls until the server is ready, so none arrive before.
    """

    def __init__(self, config: Settings, service: LoraloomService | None = None) -> None:
        self.config = config
        self.service = service

    def _request(self, request: generate_pb2.GenerateRequest, context: aio.ServicerContext):
        """The engine's request and the image format (both checked before any work)."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            asked = convert.generate_request(
                request, default_steps=self.config.limits.default_steps, deadline=deadline
            )
            return asked, convert.image_format(request)
        except InvalidArgument as error:
            self.service.refused(error)
            raise

    async def _run(self, future, cancel: threading.Event):
        """Await the scheduler's future; a cancelled call (client, deadline) stops work at the next step."""
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancel.set()
            raise

    async def Generate(self, request, context):
        cancel = threading.Event()
        asked, image_format = self._request(request, context)
        future = await asyncio.to_thread(self.service.submit, asked, cancel=cancel)
        result = await self._run(future, cancel)
        images = await asyncio.to_thread(self.service.encode, result, image_format)
        size = sum(len(item.data) for item in images)
        if size + MESSAGE_OVERHEAD_BYTES > self.config.api.max_message_bytes:
            raise ResourceExhausted(
                f"the {len(images)} image(s) take {size} bytes, more than this server's message limit "
                f"({self.config.api.max_message_bytes} bytes, less {MESSAGE_OVERHEAD_BYTES} for the rest "
                "of the response): use GenerateStream, which sends images in chunks, or ask for fewer "
                "or smaller images (or JPEG)",
                retry_after_s=DO_NOT_RETRY,
            )
        return generate_pb2.GenerateResponse(
            images=[convert.image(item) for item in images], **convert.outcome(result, asked.request_id)
        )

    async def GenerateStream(self, request, context):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def on_progress(progress: Progress) -> None:  # on the scheduler's worker thread
            loop.call_soon_threadsafe(events.put_nowait, _progress_message(progress))

        asked, image_format = self._request(request, context)
        future = await asyncio.to_thread(self.service.submit, asked, on_progress=on_progress, cancel=cancel)
        waiter = asyncio.ensure_future(self._run(future, cancel))
        waiter.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while (message := await events.get()) is not None:
                yield message
            result = await waiter
        finally:
            if not waiter.done():
                cancel.set()
                waiter.cancel()
        while not events.empty():  # progress posted just before the result
            message = events.get_nowait()
            if message is not None:
                yield message
        images = await asyncio.to_thread(self.service.encode, result, image_format)
        for index, encoded in enumerate(images):
            for message in convert.image_chunks(index, encoded, self.config.api.chunk_bytes):
                yield message
        yield generate_pb2.GenerateStreamResponse(
            done=generate_pb2.DoneEvent(**convert.outcome(result, asked.request_id))
        )

    async def ListAdapters(self, request, context):
        page = await asyncio.to_thread(
            self.service.list_adapters,
            request.name_prefix,
            request.architecture,
            request.tag,
            request.all_versions,
            request.page_size,
            request.page_token,
        )
        return adapters_pb2.ListAdaptersResponse(
            adapters=[convert.adapter_version(item) for item in page.items],
            next_page_token=page.next_page_token or "",
        )

    async def GetAdapter(self, request, context):
        return convert.adapter_version(await asyncio.to_thread(self.service.get_adapter, request.ref))

    async def UploadAdapter(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "metadata":
            raise InvalidArgument("UploadAdapter: send UploadMetadata first, then the file in chunks")
        meta = first.metadata
        session = await asyncio.to_thread(
            self.service.begin_upload,
            meta.name,
            meta.sha256,
            meta.size_bytes,
            description=meta.description,
            metadata=dict(meta.metadata),
            aliases=tuple(meta.aliases),
            tags=tuple(meta.tags),
            trigger_words=tuple(meta.trigger_words),
        )
        try:
            async for part in request_iterator:
                if part.WhichOneof("part") != "chunk":
                    raise InvalidArgument("UploadAdapter: only chunks may follow the metadata message")
                await asyncio.to_thread(session.write, part.chunk)
            version = await asyncio.to_thread(session.finish)
        except BaseException as error:
            await asyncio.to_thread(session.abort, error if isinstance(error, Exception) else None)
            raise
        return convert.adapter_version(version)

    async def DeleteAdapter(self, request, context):
        deleted = await asyncio.to_thread(self.service.delete_adapter, request.ref)
        return adapters_pb2.DeleteAdapterResponse(deleted=[convert.adapter_version(item) for item in deleted])

    async def SetAlias(self, request, context):
        service = self.service
        version = await asyncio.to_thread(service.set_alias, request.name, request.alias, request.version)
        return convert.adapter_version(version)

    async def VerifyStore(self, request, context):
        report = await asyncio.to_thread(self.service.verify_store, request.repair)
        return convert.verify_report(report)

    async def LoadAdapter(self, request, context):
        resident = await asyncio.to_thread(self.service.load_adapter, request.ref, request.pin)
        return convert.resident_adapter(resident)

    async def UnloadAdapter(self, request, context):
        unloaded = await asyncio.to_thread(self.service.unload_adapter, request.ref)
        return adapters_pb2.UnloadAdapterResponse(unloaded=unloaded)

    async def ListResidentAdapters(self, request, context):
        return convert.resident_list(await asyncio.to_thread(self.service.resident))

    async def GetServerInfo(self, request, context) -> server_pb2.ServerInfo:
        return convert.server_info(await asyncio.to_thread(self.service.info))


def _progress_message(progress: Progress) -> generate_pb2.GenerateStreamResponse:
    if progress.stage == "queued":
        return generate_pb2.GenerateStreamResponse(
            queued=generate_pb2.QueuedEvent(position=progress.queue_position)
        )
    event = generate_pb2.ProgressEvent(step=progress.step, total_steps=progress.total_steps)
    if progress.preview is not None:
        event.preview.CopyFrom(convert.image(encode_image(progress.preview, "png", progress.seed)))
    return generate_pb2.GenerateStreamResponse(progress=event)
