"""The data plane: base model + engine/scheduler + adapter store behind plain Python calls.

``server.api.servicer`` converts protobuf to and from these calls and adds nothing
else; everything here can be used and tested without gRPC. ``server.bootstrap``
builds the parts and hands them in. Blocking calls (store, resolving a blend,
engine) are meant to run off the event loop: the servicer hands them to threads,
and generation runs on the scheduler's worker thread.
"""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from adapters.errors import Cancelled, InvalidArgument, NotFound, ResourceExhausted
from adapters.store import AdapterStore
from adapters.store.models import AdapterPage, AdapterVersion, VerifyReport
from adapters.store.names import LATEST, parse_ref
from server.engine.types import (
    EngineStats,
    GenerateRequest,
    GenerateResult,
    Limits,
    Progress,
    QueueStats,
    ResidentAdapter,
)
from server.readiness import OutOfMemoryWatch
from server.settings import Settings

log = logging.getLogger(__name__)

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
UPLOAD_QUEUE_CHUNKS = 8
MAX_UPLOADS = 4  # concurrent UploadAdapter calls; more get RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class EncodedImage:
    """An image as bytes on the wire."""

    data: bytes
    mime_type: str
    width: int
    height: int
    seed: int = 0


def encode_image(image, image_format: str = "png", seed: int = 0) -> EncodedImage:
    """PNG (lossless) or JPEG (quality 95) bytes of a PIL image."""
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    elif image_format == "png":
        image.save(buffer, format="PNG")
    else:
        raise InvalidArgument(f"unknown image format {image_format!r}; use png or jpeg")
    return EncodedImage(buffer.getvalue(), MIME_TYPES[image_format], image.width, image.height, seed)


@dataclass(frozen=True)
class ServerInfo:
    """What GetServerInfo reports."""

    version: str
    base_name: str
    base_source: str
    architecture: str
    fingerprint: str
    resolution: int
    family: str
    backend: str  # the plain name: torch, onnxruntime, openvino, tensorrt
    device: str
    dtype: str
    limits: Limits
    max_queue: int
    max_message_bytes: int
    max_upload_bytes: int
    cache: EngineStats
    queue: QueueStats
    ready: bool
    precision: str = "fp32"  # what the backend computes in: fp32, fp16, bf16


@dataclass
class ResidentListing:
    adapters: list[ResidentAdapter]
    cache: EngineStats


class _ChunkReader(io.RawIOBase):
    """A read-only stream fed chunk by chunk from another thread (bounded, so uploads apply backpressure)."""

    def __init__(self) -> None:
        self._chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(UPLOAD_QUEUE_CHUNKS)
        self._buffer = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def feed(self, chunk: bytes | BaseException | None, consumer: Future) -> None:
        """Queue ``chunk``; if the consumer has stopped, raise its error instead of waiting forever."""
        while True:
            try:
                self._chunks.put(chunk, timeout=0.05)
                return
            except queue.Full:
                if consumer.done():
                    consumer.result()
                    raise InvalidArgument("the store stopped reading the upload") from None

    def readinto(self, target) -> int:
        while not self._buffer and not self._eof:
            item = self._chunks.get()
            if item is None:
                self._eof = True
            elif isinstance(item, BaseException):
                raise item
            else:
                self._buffer = item
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size


@dataclass
class UploadSession:
    """One UploadAdapter in progress: ``write`` chunks, then ``finish`` (or ``abort``).

    The store reads the chunks as they come (on its own thread), hashes and stages
    them; nothing is visible until ``finish`` returns the new version.
    """

    name: str
    sha256: str
    size_bytes: int
    _reader: _ChunkReader
    _result: Future
    received: int = 0
    _closed: bool = field(default=False)

    def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.size_bytes:
            error = InvalidArgument(
                f"upload of {self.name!r} sent more than the {self.size_bytes} bytes its metadata declared"
            )
            self.abort(error)
            raise error
        self._reader.feed(bytes(chunk), self._result)

    def finish(self) -> AdapterVersion:
        if self.received != self.size_bytes:
            error = InvalidArgument(
                f"upload of {self.name!r} ended after {self.received} of {self.size_bytes} declared bytes; "
                "send the whole file"
            )
            self.abort(error)
            raise error
        self._closed = True
        self._reader.feed(None, self._result)
        return self._result.result()

    def abort(self, reason: BaseException | None = None) -> None:
        """Stop the upload; the store discards what it staged."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(BaseException):  # failing is the expected outcome
            self._reader.feed(reason or InvalidArgument("upload aborted"), self._result)
            self._result.result()


class LoraloomService:
    """Generation and adapter management for one resident base model."""

    def __init__(self, settings: Settings, base, store: AdapterStore, engine, scheduler) -> None:
        self.settings = settings
        self.base = base
        self.store = store
        self.engine = engine
        self.scheduler = scheduler
        self.ready = False
        self.memory = OutOfMemoryWatch(settings.engine.oom_unready_after, self._probe)
        self.observers: list[Callable[..., None]] = [self.memory]
        self._uploads = ThreadPoolExecutor(max_workers=MAX_UPLOADS, thread_name_prefix="loraloom-upload")
        self._upload_slots = threading.BoundedSemaphore(MAX_UPLOADS)

    # ------------------------------------------------------------------ lifecycle

    def warmup(self) -> None:
        """One short generation so the first real request does not pay for lazy initialisation."""
        if self.settings.engine.warmup:
            started = time.perf_counter()
            swap_ms = self.engine.warm_up()  # a blend swap and back: a user's first pays no one-time cost
            # One step compiles every part for the default size (from the compiled-model cache on a
            # restart); each step more is pure compute (SD 1.5 on 2 cores: ~4 s). torch.compile's
            # graphs settle on the second call, so a compiled engine runs two.
            steps = 2 if self.settings.engine.compile else 1
            job = self.engine.job(GenerateRequest(prompt="warmup", steps=steps, seed=0))
            # The decode is stopped (as a cancelled request is, before it) and the decoder only
            # prepared for the size: at SD 1.5 size decoding 512 px is ~10 s of pure compute.
            denoised = threading.Event()

            def on_progress(progress: Progress) -> None:
                if progress.stage == "step" and progress.step == progress.total_steps:
                    denoised.set()

            future = self.scheduler.submit(job, on_progress=on_progress, cancel=denoised, counted=False)
            try:
                future.result()
            except Cancelled:
                if not denoised.is_set():
                    raise
            self.engine.prepare_decode(job.settings)
            log.info(
                "warmed up in %.2fs (a blend swap and back: %.0f ms)", time.perf_counter() - started, swap_ms
            )
        self.ready = True

    def _probe(self) -> None:
        """One small generation: does the engine work again? (readiness after out-of-memory failures)"""
        self.submit(GenerateRequest(prompt="readiness probe", steps=1, seed=0), counted=False).result()

    def close(self, timeout: float = 5.0) -> None:
        self.memory.close()
        self.scheduler.close(drain=False, timeout=timeout)
        self._uploads.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    # ------------------------------------------------------------------ generation

    def submit(
        self,
        request: GenerateRequest,
        on_progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
        *,
        counted: bool = True,
    ) -> Future[GenerateResult]:
        """Normalize and resolve ``request`` (blocking: a store read unless cached), then queue it.

        Raises InvalidArgument (bad request), NotFound (unknown adapter) and
        ResourceExhausted (queue full). Each of ``observers`` is called
        ``(request, result, error)`` when it finishes (metrics, logs). ``counted=False``: the
        server's own request (readiness probe), left out of the queue statistics.
        """
        try:
            job = self.engine.job(request)
            future = self.scheduler.submit(job, on_progress=on_progress, cancel=cancel, counted=counted)
        except BaseException as error:
            if counted:
                self.refused(error)
            self._notify(request, None, error)
            raise
        future.add_done_callback(lambda done: self._finished(request, done))
        return future

    def refused(self, error: BaseException) -> None:
        """A generation request was refused before it reached the queue (counted in ``info().queue``:
        INVALID_ARGUMENT as ``invalid``)."""
        self.scheduler.refused(error)

    def _finished(self, request: GenerateRequest, future: Future) -> None:
        if future.cancelled():
            self._notify(request, None, Cancelled("cancelled"))
        elif future.exception() is not None:
            self._notify(request, None, future.exception())
        else:
            self._notify(request, future.result(), None)

    def _notify(self, request, result, error) -> None:
        for observer in self.observers:
            try:
                observer(request, result, error)
            except Exception:  # an observer must never fail a request
                log.exception("observer %r failed", observer)

    @staticmethod
    def encode(result: GenerateResult, image_format: str = "png") -> list[EncodedImage]:
        pairs = zip(result.images, result.parameters.seeds, strict=False)
        return [encode_image(image, image_format, seed) for image, seed in pairs]

    # ------------------------------------------------------------------ the store

    def list_adapters(
        self,
        prefix: str = "",
        architecture: str = "",
        tag: str = "",
        all_versions: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> AdapterPage:
        return self.store.list(
            prefix=prefix or None,
            tag=tag or None,
            base_model=architecture or None,
            page_size=page_size or 50,
            page_token=page_token or None,
            latest_only=not all_versions,
        )

    def get_adapter(self, ref: str) -> AdapterVersion:
        return self.store.get(ref)

    def begin_upload(
        self,
        name: str,
        sha256: str,
        size_bytes: int,
        *,
        description: str = "",
        metadata: dict[str, str] | None = None,
        aliases: tuple[str, ...] = (),
        tags: tuple[str, ...] = (),
        trigger_words: tuple[str, ...] = (),
    ) -> UploadSession:
        if not sha256:
            raise InvalidArgument("upload metadata needs the file's sha256 (lowercase hex)")
        if size_bytes <= 0:
            raise InvalidArgument("upload metadata needs the file's size_bytes (> 0)")
        limit = self.settings.store.max_upload_bytes
        if size_bytes > limit:
            raise InvalidArgument(
                f"adapter of {size_bytes} bytes exceeds this server's upload limit of "
                f"{limit} bytes (LORALOOM_MAX_UPLOAD_MB)"
            )
        if not self._upload_slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"{MAX_UPLOADS} uploads are already in progress on this server; retry shortly",
                retry_after_s=2.0,
            )
        reader = _ChunkReader()
        result = self._uploads.submit(
            self.store.register,
            name,
            io.BufferedReader(reader, buffer_size=1 << 20),
            description=description,
            tags=tags,
            trigger_words=trigger_words,
            training_metadata=dict(metadata or {}),
            expected_sha256=sha256,
            aliases=tuple(aliases),
        )
        result.add_done_callback(lambda _: self._upload_slots.release())
        result.add_done_callback(lambda done: self._uploaded(name, done))
        return UploadSession(name, sha256, size_bytes, reader, result)

    def _uploaded(self, name: str, done: Future) -> None:
        """A new version of ``name`` is visible: resolve its references afresh. A failed upload
        changed nothing, and keeps what they resolved to (the fallback while the store is down)."""
        if not done.cancelled() and done.exception() is None:
            self.engine.resolver.invalidate(name)

    def _exact(self, ref: str) -> str:
        """``name@latest`` as the ``name@N`` it means now; any other ref as given.

        ``parse_ref`` reads ``name@latest`` as plain ``name`` (the newest version where one version
        is meant), but delete and unload read plain ``name`` as every version of the name.
        """
        if ref.partition("@")[2] == LATEST:
            return self.store.get(ref).ref
        return ref

    def delete_adapter(self, ref: str) -> list[AdapterVersion]:
        """Delete ``name@version`` (or the version an alias or ``@latest`` names), or every version of
        ``name``."""
        parsed = parse_ref(self._exact(ref))
        version = None
        if parsed.version is not None or parsed.alias is not None:
            version = self.store.get(parsed).version
        deleted = list(self.store.delete(parsed.name, version))
        self.engine.resolver.invalidate(parsed.name)
        for item in deleted:
            self.engine.unload(item.ref)
        return deleted

    def set_alias(self, name: str, alias: str, version: int) -> AdapterVersion:
        moved = self.store.set_alias(name, alias, version)
        self.engine.resolver.invalidate(name)
        return moved

    def verify_store(self, repair: bool = False) -> VerifyReport:
        """Re-read every stored version's blob as a load does (sha256, size, decoding) and report
        the damaged ones; with ``repair``, also remove orphan blobs and stale temp files."""
        return self.store.verify(repair=repair)

    # ------------------------------------------------------------------ the engine's cache

    def load_adapter(self, ref: str, pin: bool = False) -> ResidentAdapter:
        return self.engine.load(ref, pin=pin)

    def unload_adapter(self, ref: str) -> bool:
        """Drop ``name@N``, ``name@alias``, ``name@latest`` or every resident version of ``name``;
        False if none was."""
        try:
            return self.engine.unload(self._exact(ref))
        except NotFound:  # ``name@latest`` of a name the store does not hold
            return False

    def resident(self) -> ResidentListing:
        return ResidentListing(adapters=list(self.engine.resident()), cache=self.engine.stats())

    # ------------------------------------------------------------------ the server

    def info(self) -> ServerInfo:
        return ServerInfo(
            version=package_version(),
            base_name=self.base.name,
            base_source=self.base.source,
            architecture=self.base.architecture,
            fingerprint=self.base.fingerprint,
            resolution=self.base.resolution,
            family=self.base.family.architecture,
            backend=getattr(self.engine, "backend", "torch"),
            precision=_precision(self.engine, self.base.dtype),
            device=str(self.base.device),
            dtype=str(self.base.dtype).removeprefix("torch."),
            limits=self.settings.limits,
            max_queue=self.scheduler.max_queue,
            max_message_bytes=self.settings.api.max_message_bytes,
            max_upload_bytes=self.settings.store.max_upload_bytes,
            cache=self.engine.stats(),
            queue=self.scheduler.stats(),
            ready=self.ready,
        )


# torch dtypes by name -> the precision names backends use
PRECISION_OF_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _precision(engine, dtype) -> str:
    """What the backend computes in: the torch backend runs the weights' dtype; the others
    report their own (OpenVINO's bf16 or fp32)."""
    backend = getattr(engine, "backend", "torch")
    if backend == "torch":
        name = str(dtype).removeprefix("torch.")
        return PRECISION_OF_DTYPE.get(name, name)
    return getattr(engine, "precision", "fp32")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loraloom")
    except PackageNotFoundError:
        return "0.1.0+source"
