"""The asyncio client: ``async with AsyncClient(target) as client: await client.generate(...)``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapters.errors import DeadlineExceeded, LoraloomError, Unavailable
from server.api.pb.loraloom.v1 import adapters_pb2, service_pb2_grpc
from server.client import _common, convert, types
from server.client.errors import from_rpc_error
from server.client.secure import aio_channel


class AsyncClient:
    """The asyncio twin of ``server.client.Client``: same methods, awaited."""

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = None,
        retries: int = 0,
        max_message_bytes: int = _common.DEFAULT_MAX_MESSAGE_BYTES,
        channel: aio.Channel | None = None,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ) -> None:
        self.target = target or _common.default_target()
        self.timeout = timeout
        self.retries = retries
        self._channel = channel or aio_channel(
            self.target,
            _common.channel_options(max_message_bytes),
            token=token,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )
        self._stub = service_pb2_grpc.LoraloomStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method, request, timeout: float | None, *, retry: bool = True):
        attempt = 0
        while True:
            try:
                return await method(request, timeout=self.timeout if timeout is None else timeout)
            except grpc.RpcError as error:
                typed = from_rpc_error(error)
            delay = _common.retry_delay(typed, attempt) if retry and attempt < self.retries else None
            if delay is None:
                raise typed
            await asyncio.sleep(delay)
            attempt += 1

    async def generate(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        on_event=None,
        merge: str = "linear",
        density: float | None = None,
        merge_seed: int | None = None,
        **options,
    ) -> types.GenerateResult:
        """See ``Client.generate``; ``on_event`` may be a plain function or a coroutine function."""
        options.update(merge=merge, density=density, merge_seed=merge_seed)
        if on_event is None:
            request = convert.generate_request(prompt, **options)
            return convert.generate_result(await self._call(self._stub.Generate, request, timeout))
        async for event in self.generate_stream(prompt, timeout=timeout, **options):
            outcome = on_event(event)
            if asyncio.iscoroutine(outcome):
                await outcome
            if isinstance(event, types.Done):
                return event.result
        raise Unavailable("the server closed the stream before the images were complete")

    async def generate_stream(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        merge: str = "linear",
        density: float | None = None,
        merge_seed: int | None = None,
        **options,
    ) -> AsyncIterator[types.StreamEvent]:
        """See ``Client.generate_stream``."""
        request = convert.generate_request(
            prompt, merge=merge, density=density, merge_seed=merge_seed, **options
        )
        call = self._stub.GenerateStream(request, timeout=self.timeout if timeout is None else timeout)
        assembler = convert.StreamAssembler()
        try:
            async for message in call:
                event = assembler.feed(message)
                if event is not None:
                    yield event
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def list_adapters(
        self,
        *,
        name_prefix: str = "",
        architecture: str = "",
        tag: str = "",
        all_versions: bool = False,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> types.AdapterPage:
        request = _common.list_request(name_prefix, architecture, tag, all_versions, page_size, page_token)
        response = await self._call(self._stub.ListAdapters, request, timeout)
        return types.AdapterPage(
            adapters=[convert.adapter_info(item) for item in response.adapters],
            next_page_token=response.next_page_token,
        )

    async def get_adapter(self, ref: str, *, timeout: float | None = None) -> types.AdapterInfo:
        request = adapters_pb2.GetAdapterRequest(ref=ref)
        return convert.adapter_info(await self._call(self._stub.GetAdapter, request, timeout))

    async def upload_adapter(
        self,
        source: str | Path | bytes,
        name: str,
        *,
        description: str = "",
        metadata: dict[str, str] | None = None,
        aliases: tuple[str, ...] | list[str] = (),
        tags: tuple[str, ...] | list[str] = (),
        trigger_words: tuple[str, ...] | list[str] = (),
        chunk_size: int = _common.DEFAULT_CHUNK_BYTES,
        timeout: float | None = None,
    ) -> types.AdapterInfo:
        data, digest = await asyncio.to_thread(_common.read_adapter, source)
        messages = convert.upload_messages(
            name,
            data,
            digest,
            description=description,
            metadata=metadata,
            aliases=aliases,
            tags=tags,
            trigger_words=trigger_words,
            chunk_size=chunk_size,
        )
        response = await self._call(self._stub.UploadAdapter, messages, timeout, retry=False)
        return convert.adapter_info(response)

    async def delete_adapter(self, ref: str, *, timeout: float | None = None) -> list[types.AdapterInfo]:
        request = adapters_pb2.DeleteAdapterRequest(ref=ref)
        response = await self._call(self._stub.DeleteAdapter, request, timeout)
        return [convert.adapter_info(item) for item in response.deleted]

    async def set_alias(self, name: str, alias: str, version: int, *, timeout: float | None = None):
        request = adapters_pb2.SetAliasRequest(name=name, alias=alias, version=version)
        return convert.adapter_info(await self._call(self._stub.SetAlias, request, timeout))

    async def verify_store(self, *, repair: bool = False, timeout: float | None = None) -> types.StoreReport:
        """See ``Client.verify_store``."""
        request = adapters_pb2.VerifyStoreRequest(repair=repair)
        return convert.store_report(await self._call(self._stub.VerifyStore, request, timeout))

    async def load_adapter(self, ref: str, *, pin: bool = False, timeout: float | None = None):
        request = adapters_pb2.LoadAdapterRequest(ref=ref, pin=pin)
        return convert.resident_adapter(await self._call(self._stub.LoadAdapter, request, timeout))

    async def unload_adapter(self, ref: str, *, timeout: float | None = None) -> bool:
        request = adapters_pb2.UnloadAdapterRequest(ref=ref)
        return (await self._call(self._stub.UnloadAdapter, request, timeout)).unloaded

    async def list_resident(self, *, timeout: float | None = None) -> types.ResidentList:
        request = adapters_pb2.ListResidentAdaptersRequest()
        return convert.resident_list(await self._call(self._stub.ListResidentAdapters, request, timeout))

    async def server_info(self, *, timeout: float | None = None) -> types.ServerInfo:
        request = _common.SERVER_INFO_REQUEST
        return convert.server_info(await self._call(self._stub.GetServerInfo, request, timeout))

    async def health(self, service: str = _common.READINESS_SERVICE, *, timeout: float | None = 5.0) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._call(self._health.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.health(timeout=max(0.1, min(5.0, deadline - time.monotonic()))) == "SERVING":
                    return
            except LoraloomError:
                pass
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"{self.target} not ready after {timeout:g}s")
            await asyncio.sleep(0.1)
