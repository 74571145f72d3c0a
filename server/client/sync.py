"""The blocking client: ``with Client("127.0.0.1:50051") as client: client.generate("a red circle")``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapters.errors import DeadlineExceeded, LoraloomError, Unavailable
from server.api.pb.loraloom.v1 import adapters_pb2, service_pb2_grpc
from server.client import _common, convert, types
from server.client.errors import from_rpc_error
from server.client.secure import sync_channel


class Client:
    """Typed, blocking access to a loraloom server; failures raise ``adapters.errors`` types.

    ``timeout`` (seconds) is the default deadline of every call; each method takes its own too.
    ``retries``: how often a unary call is retried after RESOURCE_EXHAUSTED (waiting as the
    server's hint says) or UNAVAILABLE (backing off); uploads and streams are not retried.
    ``token``: bearer token sent with every call (default ``$LORALOOM_TOKEN``); ``tls``/``tls_ca``:
    connect over TLS (trusting ``tls_ca``, else the system roots); ``tls_cert``/``tls_key``: the
    client certificate for mutual TLS.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = None,
        retries: int = 0,
        max_message_bytes: int = _common.DEFAULT_MAX_MESSAGE_BYTES,
        channel: grpc.Channel | None = None,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ) -> None:
        self.target = target or _common.default_target()
        self.timeout = timeout
        self.retries = retries
        self._channel = channel or sync_channel(
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

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout: float | None, *, retry: bool = True):
        attempt = 0
        while True:
            try:
                return method(request, timeout=self.timeout if timeout is None else timeout)
            except grpc.RpcError as error:
                typed = from_rpc_error(error)
            delay = _common.retry_delay(typed, attempt) if retry and attempt < self.retries else None
            if delay is None:
                raise typed
            time.sleep(delay)
            attempt += 1

    # Generation

    def generate(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[types.StreamEvent], None] | None = None,
        merge: str = "linear",
        density: float | None = None,
        merge_seed: int | None = None,
        **options,
    ) -> types.GenerateResult:
        """Generate images. With ``on_event`` the call streams and reports each event as it comes.

        ``options``: adapters (``"name[@version][:weight]"`` strings, also ``"name:0.8:0.5"`` for
        text-encoder and UNet weights; ``AdapterSpec`` or ``(ref, weight)``), negative_prompt,
        steps, guidance_scale, seed, width, height, num_images, image_format ("png" or "jpeg"),
        preview_every, request_id, sampler; img2img/inpainting: init_image and mask_image (PNG or
        JPEG bytes), strength (0-1; None: 0.75 with an init image); clip_skip (A1111's: 1 = last
        layer), schedule ("karras", "exponential", "beta", "sgm_uniform"), eta (ddim).

        ``merge``: how the blend's adapters combine, one of ``types.MERGE_METHODS``: "linear"
        (the weighted sum), "ties" (keep each adapter's largest deltas, elect a sign per
        parameter, average those that agree), "dare_linear" / "dare_ties" (drop deltas at
        random and rescale, then sum / merge as ties). ``density``: the fraction of each delta
        ties and dare_* keep, in (0, 1] (None: the server's 0.5). ``merge_seed``: the seed of
        dare_*'s masks (None: 0). What ran comes back in ``result.parameters`` (``merge``,
        ``density``, ``merge_seed``).
        """
        options.update(merge=merge, density=density, merge_seed=merge_seed)
        if on_event is None:
            request = convert.generate_request(prompt, **options)
            return convert.generate_result(self._call(self._stub.Generate, request, timeout))
        for event in self.generate_stream(prompt, timeout=timeout, **options):
            on_event(event)
            if isinstance(event, types.Done):
                return event.result
        raise Unavailable("the server closed the stream before the images were complete")

    def generate_stream(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        merge: str = "linear",
        density: float | None = None,
        merge_seed: int | None = None,
        **options,
    ) -> Iterator[types.StreamEvent]:
        """Queued, Progress..., ImageReady..., Done. Closing the iterator early cancels the request.

        The options are those of ``generate``.
        """
        request = convert.generate_request(
            prompt, merge=merge, density=density, merge_seed=merge_seed, **options
        )
        call = self._stub.GenerateStream(request, timeout=self.timeout if timeout is None else timeout)
        assembler = convert.StreamAssembler()
        try:
            for message in call:
                event = assembler.feed(message)
                if event is not None:
                    yield event
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    # Adapters in the store

    def list_adapters(
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
        response = self._call(self._stub.ListAdapters, request, timeout)
        return types.AdapterPage(
            adapters=[convert.adapter_info(item) for item in response.adapters],
            next_page_token=response.next_page_token,
        )

    def iter_adapters(self, **filters) -> Iterator[types.AdapterInfo]:
        """Every matching adapter version, fetching page after page."""
        token = ""
        while True:
            page = self.list_adapters(page_token=token, **filters)
            yield from page.adapters
            token = page.next_page_token
            if not token:
                return

    def get_adapter(self, ref: str, *, timeout: float | None = None) -> types.AdapterInfo:
        response = self._call(self._stub.GetAdapter, adapters_pb2.GetAdapterRequest(ref=ref), timeout)
        return convert.adapter_info(response)

    def upload_adapter(
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
        """Upload a .safetensors file (a path or its bytes) as a new version of ``name``."""
        data, digest = _common.read_adapter(source)
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
        return convert.adapter_info(self._call(self._stub.UploadAdapter, messages, timeout, retry=False))

    def delete_adapter(self, ref: str, *, timeout: float | None = None) -> list[types.AdapterInfo]:
        response = self._call(self._stub.DeleteAdapter, adapters_pb2.DeleteAdapterRequest(ref=ref), timeout)
        return [convert.adapter_info(item) for item in response.deleted]

    def set_alias(self, name: str, alias: str, version: int, *, timeout: float | None = None):
        request = adapters_pb2.SetAliasRequest(name=name, alias=alias, version=version)
        return convert.adapter_info(self._call(self._stub.SetAlias, request, timeout))

    def verify_store(self, *, repair: bool = False, timeout: float | None = None) -> types.StoreReport:
        """Have the server re-read every stored version's blob (sha256, size, decoding) and list
        the damaged ones; ``repair`` also removes leftovers. Needs the manage scope."""
        request = adapters_pb2.VerifyStoreRequest(repair=repair)
        return convert.store_report(self._call(self._stub.VerifyStore, request, timeout))

    # The engine's adapter cache

    def load_adapter(self, ref: str, *, pin: bool = False, timeout: float | None = None):
        request = adapters_pb2.LoadAdapterRequest(ref=ref, pin=pin)
        return convert.resident_adapter(self._call(self._stub.LoadAdapter, request, timeout))

    def unload_adapter(self, ref: str, *, timeout: float | None = None) -> bool:
        request = adapters_pb2.UnloadAdapterRequest(ref=ref)
        return self._call(self._stub.UnloadAdapter, request, timeout).unloaded

    def list_resident(self, *, timeout: float | None = None) -> types.ResidentList:
        request = adapters_pb2.ListResidentAdaptersRequest()
        return convert.resident_list(self._call(self._stub.ListResidentAdapters, request, timeout))

    # The server

    def server_info(self, *, timeout: float | None = None) -> types.ServerInfo:
        return convert.server_info(self._call(self._stub.GetServerInfo, _common.SERVER_INFO_REQUEST, timeout))

    def health(self, service: str = _common.READINESS_SERVICE, *, timeout: float | None = 5.0) -> str:
        """``SERVING``, ``NOT_SERVING``, ... of ``service`` ("" is liveness)."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._call(self._health.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until readiness is SERVING; raise DeadlineExceeded after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=max(0.1, min(5.0, deadline - time.monotonic()))) == "SERVING":
                    return
            except LoraloomError:
                pass
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"{self.target} not ready after {timeout:g}s")
            time.sleep(0.1)
