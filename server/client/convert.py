"""Protobuf messages to and from the client's dataclasses, and chunked-image reassembly."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from adapters.errors import InvalidArgument
from server import records
from server.api.pb.loraloom.v1 import adapters_pb2, generate_pb2, server_pb2
from server.client import types

FORMATS = {
    "png": generate_pb2.IMAGE_FORMAT_PNG,
    "jpeg": generate_pb2.IMAGE_FORMAT_JPEG,
    "jpg": generate_pb2.IMAGE_FORMAT_JPEG,
}


def adapter_specs(adapters: Iterable[str | types.AdapterSpec | tuple[str, float]] | None):
    """AdapterSpec messages; per-part weights are sent only when the parts differ."""
    specs = []
    for item in adapters or ():
        if isinstance(item, str):
            item = types.AdapterSpec.parse(item)
        elif isinstance(item, tuple):
            item = types.AdapterSpec(item[0], float(item[1]))
        te, unet = item.parts
        if te == unet:
            specs.append(generate_pb2.AdapterSpec(ref=item.ref, weight=te))
        else:
            specs.append(
                generate_pb2.AdapterSpec(ref=item.ref, weight=unet, text_encoder_weight=te, unet_weight=unet)
            )
    return specs


def generate_request(
    prompt: str,
    *,
    adapters=None,
    negative_prompt: str = "",
    steps: int = 0,
    guidance_scale: float | None = None,
    seed: int | None = None,
    width: int = 0,
    height: int = 0,
    num_images: int = 1,
    image_format: str = "png",
    preview_every: int = 0,
    request_id: str = "",
    sampler: str = "",
    merge: str = "linear",
    density: float | None = None,
    merge_seed: int | None = None,
    init_image: bytes | None = None,
    mask_image: bytes | None = None,
    strength: float | None = None,
    clip_skip: int = 0,
    schedule: str = "",
    eta: float | None = None,
) -> generate_pb2.GenerateRequest:
    try:
        fmt = FORMATS[image_format.lower()]
    except KeyError:
        raise InvalidArgument(f"unknown image format {image_format!r}; use png or jpeg") from None
    request = generate_pb2.GenerateRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        adapters=adapter_specs(adapters),
        steps=steps,
        width=width,
        height=height,
        num_images=num_images,
        format=fmt,
        preview_every=preview_every,
        request_id=request_id,
        sampler=sampler,
        init_image=init_image or b"",
        mask_image=mask_image or b"",
        clip_skip=clip_skip,
        schedule=schedule,
    )
    if guidance_scale is not None:
        request.guidance_scale = guidance_scale
    if strength is not None:
        request.strength = strength
    if eta is not None:
        request.eta = eta
    if seed is not None:
        request.seed = seed
    blend = blend_merge(merge, density, merge_seed)
    if blend is not None:
        request.merge.CopyFrom(blend)
    return request


def blend_merge(
    method: str = "linear", density: float | None = None, seed: int | None = None
) -> generate_pb2.BlendMerge | None:
    """GenerateRequest.merge, or None for the default (linear, no density or seed given).

    The method, density and seed are checked by the server (INVALID_ARGUMENT), which knows
    the merges it runs; only a negative seed, which the wire cannot carry, is refused here.
    """
    method = method or "linear"
    if method == "linear" and density is None and seed is None:
        return None
    message = generate_pb2.BlendMerge(method=method)
    if density is not None:
        message.density = density
    if seed is not None:
        if seed < 0:
            raise InvalidArgument(f"merge seed must be >= 0, is {seed}")
        message.seed = seed
    return message


def image(message: generate_pb2.Image) -> types.Image:
    return types.Image(
        data=message.data,
        mime_type=message.mime_type,
        width=message.width,
        height=message.height,
        seed=message.seed,
    )


def timing(message: generate_pb2.Timing) -> types.Timing:
    return types.Timing(
        queue_ms=message.queue_ms,
        swap_ms=message.swap_ms,
        inference_ms=message.inference_ms,
        total_ms=message.total_ms,
    )


def parameters(message: generate_pb2.GenerationParameters) -> types.Parameters:
    return types.Parameters(
        prompt=message.prompt,
        negative_prompt=message.negative_prompt,
        width=message.width,
        height=message.height,
        steps=message.steps,
        guidance_scale=message.guidance_scale,
        seed=message.seed,
        sampler=message.sampler,
        num_images=message.num_images,
        adapters=tuple(
            records.AppliedAdapter(
                item.name,
                item.version,
                item.sha256,
                item.weight,
                text_encoder_weight=item.text_encoder_weight
                if item.HasField("text_encoder_weight")
                else None,
                unet_weight=item.unet_weight if item.HasField("unet_weight") else None,
            )
            for item in message.adapters
        ),
        merge=message.merge.method or "linear",  # a server without merges leaves it empty
        density=message.merge.density,
        merge_seed=message.merge.seed if message.merge.HasField("seed") else None,
        strength=message.strength,
        init_image_sha256=message.init_image_sha256,
        mask_image_sha256=message.mask_image_sha256,
        clip_skip=message.clip_skip,
        schedule=message.schedule,
        eta=message.eta,
        prompt_pieces=tuple((piece.text, piece.weight) for piece in message.prompt_pieces),
    )


def generate_result(message: generate_pb2.GenerateResponse) -> types.GenerateResult:
    return types.GenerateResult(
        images=[image(item) for item in message.images],
        timing=timing(message.timing),
        blend_signature=message.blend_signature,
        parameters=parameters(message.parameters),
        request_id=message.request_id,
    )


class StreamAssembler:
    """Turns GenerateStream messages into client events, joining image chunks.

    Chunks of one image must arrive in order and contiguous; a gap, an overlap, a size
    mismatch or a stream that ends early is an error (the server never sends those).
    """

    def __init__(self) -> None:
        self.images: dict[int, types.Image] = {}
        self._parts: dict[int, bytearray] = {}
        self.done = False

    def feed(self, message: generate_pb2.GenerateStreamResponse) -> types.StreamEvent | None:
        kind = message.WhichOneof("event")
        if kind == "queued":
            return types.Queued(position=message.queued.position)
        if kind == "progress":
            event = message.progress
            preview = image(event.preview) if event.HasField("preview") else None
            return types.Progress(step=event.step, total_steps=event.total_steps, preview=preview)
        if kind == "image_chunk":
            return self._chunk(message.image_chunk)
        if kind == "done":
            if self._parts:
                raise ValueError(f"stream ended with incomplete images {sorted(self._parts)}")
            self.done = True
            result = types.GenerateResult(
                images=[self.images[index] for index in sorted(self.images)],
                timing=timing(message.done.timing),
                blend_signature=message.done.blend_signature,
                parameters=parameters(message.done.parameters),
                request_id=message.done.request_id,
            )
            return types.Done(result=result)
        return None

    def _chunk(self, chunk: generate_pb2.ImageChunk) -> types.ImageReady | None:
        buffer = self._parts.setdefault(chunk.index, bytearray())
        if chunk.offset != len(buffer):
            raise ValueError(f"image {chunk.index}: chunk at offset {chunk.offset}, expected {len(buffer)}")
        buffer += chunk.data
        if not chunk.last:
            return None
        del self._parts[chunk.index]
        if len(buffer) != chunk.total_size:
            raise ValueError(f"image {chunk.index}: got {len(buffer)} bytes, expected {chunk.total_size}")
        result = types.Image(
            data=bytes(buffer),
            mime_type=chunk.mime_type,
            width=chunk.width,
            height=chunk.height,
            seed=chunk.seed,
        )
        self.images[chunk.index] = result
        return types.ImageReady(index=chunk.index, image=result)


def adapter_info(message: adapters_pb2.AdapterVersion) -> types.AdapterInfo:
    return types.AdapterInfo(
        name=message.name,
        version=message.version,
        sha256=message.sha256,
        size_bytes=message.size_bytes,
        architecture=message.architecture,
        base_fingerprint=message.base_fingerprint,
        rank=message.rank,
        format=message.format,
        aliases=tuple(message.aliases),
        description=message.description,
        metadata=dict(message.metadata),
        created_at=message.created_at,
        components=tuple(message.components),
        tags=tuple(message.tags),
        trigger_words=tuple(message.trigger_words),
        training_metadata=json.loads(message.training_metadata_json or "{}"),
    )


def upload_messages(
    name: str,
    data: bytes,
    sha256: str,
    *,
    description: str = "",
    metadata: dict[str, str] | None = None,
    aliases: Sequence[str] = (),
    tags: Sequence[str] = (),
    trigger_words: Sequence[str] = (),
    chunk_size: int = 1 << 20,
):
    """The UploadAdapter stream: metadata, then ``data`` in chunks of ``chunk_size``."""
    yield adapters_pb2.UploadAdapterRequest(
        metadata=adapters_pb2.UploadMetadata(
            name=name,
            sha256=sha256,
            size_bytes=len(data),
            description=description,
            metadata=metadata or {},
            aliases=list(aliases),
            tags=list(tags),
            trigger_words=list(trigger_words),
        )
    )
    view = memoryview(data)
    for start in range(0, len(data), chunk_size):
        yield adapters_pb2.UploadAdapterRequest(chunk=bytes(view[start : start + chunk_size]))


def resident_adapter(message: adapters_pb2.ResidentAdapter) -> records.ResidentAdapter:
    return records.ResidentAdapter(
        name=message.name,
        version=message.version,
        sha256=message.sha256,
        size_bytes=message.size_bytes,
        pinned=message.pinned,
    )


def cache_stats(message: adapters_pb2.CacheStats) -> types.CacheStats:
    return types.CacheStats(
        used_bytes=message.used_bytes,
        capacity_bytes=message.capacity_bytes,
        entries=message.entries,
        hits=message.hits,
        misses=message.misses,
        evictions=message.evictions,
        swaps=message.swaps,
        plan_bytes=message.plan_bytes,
        plan_capacity_bytes=message.plan_capacity_bytes,
    )


def resident_list(message: adapters_pb2.ListResidentAdaptersResponse) -> types.ResidentList:
    return types.ResidentList(
        adapters=[resident_adapter(item) for item in message.adapters], cache=cache_stats(message.cache)
    )


def store_report(message: adapters_pb2.VerifyStoreResponse) -> types.StoreReport:
    return types.StoreReport(
        checked=message.checked,
        damaged=[types.DamagedVersion(item.ref, item.sha256, item.reason) for item in message.damaged],
        orphans=list(message.orphans),
        partials=message.partials,
        removed=message.removed,
    )


def server_info(message: server_pb2.ServerInfo) -> types.ServerInfo:
    base = message.base_model
    limits = message.limits
    queue = message.queue
    return types.ServerInfo(
        version=message.version,
        base_model=types.BaseModelInfo(
            name=base.name,
            source=base.source,
            architecture=base.architecture,
            fingerprint=base.fingerprint,
            resolution=base.resolution,
            family=base.family,
        ),
        backend=message.backend,
        precision=message.precision,
        device=message.device,
        dtype=message.dtype,
        limits=types.Limits(
            max_message_bytes=limits.max_message_bytes,
            max_upload_bytes=limits.max_upload_bytes,
            max_queue=limits.max_queue,
            max_steps=limits.max_steps,
            max_images=limits.max_images,
            max_adapters=limits.max_adapters,
            max_size=limits.max_size,
            max_prompt_bytes=limits.max_prompt_bytes,
            max_rank=limits.max_rank,
            max_abs_weight=limits.max_abs_weight,
            max_input_pixels=limits.max_input_pixels,
        ),
        cache=cache_stats(message.cache),
        queue=records.QueueStats(
            queued=queue.queued,
            running=queue.running,
            completed=queue.completed,
            failed=queue.failed,
            cancelled=queue.cancelled,
            rejected=queue.rejected,
            max_queue=limits.max_queue,  # the wire's QueueStats has no capacity; Limits does
            deadline_exceeded=queue.deadline_exceeded,
            invalid=queue.invalid,
        ),
        ready=message.ready,
    )
