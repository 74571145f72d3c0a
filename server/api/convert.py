"""Protobuf messages to and from the plain types of ``server.service`` and ``server.engine``."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import numpy as np

from adapters.blend import Merge, PartWeights, Weight
from adapters.errors import InvalidArgument
from server.api.pb.loraloom.v1 import adapters_pb2, generate_pb2, server_pb2
from server.engine.types import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_SCHEDULE,
    DEFAULT_STEPS,
    EngineStats,
    GenerateRequest,
    GenerateResult,
    GenerationParameters,
    Timings,
)
from server.service import EncodedImage, ResidentListing, ServerInfo

FORMAT_NAMES = {
    generate_pb2.IMAGE_FORMAT_UNSPECIFIED: "png",
    generate_pb2.IMAGE_FORMAT_PNG: "png",
    generate_pb2.IMAGE_FORMAT_JPEG: "jpeg",
}


def generate_request(
    message: generate_pb2.GenerateRequest,
    *,
    default_steps: int = DEFAULT_STEPS,
    deadline: float | None = None,
) -> GenerateRequest:
    """The engine's request; proto "0 / unset" values become the defaults."""
    return GenerateRequest(
        prompt=message.prompt,
        negative_prompt=message.negative_prompt,
        width=message.width or None,
        height=message.height or None,
        steps=message.steps or default_steps,
        guidance_scale=message.guidance_scale if message.HasField("guidance_scale") else DEFAULT_GUIDANCE,
        seed=message.seed if message.HasField("seed") else None,
        num_images=message.num_images or 1,
        adapters=[(spec.ref, adapter_weight(spec)) for spec in message.adapters],
        preview_every=message.preview_every,
        deadline=deadline,
        request_id=request_id(message.request_id),
        sampler=message.sampler or DEFAULT_SAMPLER,
        merge=merge(message),
        init_image=message.init_image or None,
        mask_image=message.mask_image or None,
        strength=wire_float(message.strength) if message.HasField("strength") else None,
        clip_skip=message.clip_skip,
        schedule=message.schedule or DEFAULT_SCHEDULE,
        eta=wire_float(message.eta) if message.HasField("eta") else None,
    )


def adapter_weight(spec: generate_pb2.AdapterSpec) -> Weight:
    """An AdapterSpec's weight: ``weight`` (unset: 1.0) for both parts unless a part has its own.

    The wire carries float32; each value is read back as the shortest decimal that float32 value
    stands for (0.8, not 0.800000011920929), so ``weight: 0.8`` and ``<lora:name:0.8>`` in the
    prompt are one blend: one signature, one plan, the same weights.
    """
    return PartWeights.of(
        wire_float(spec.weight) if spec.HasField("weight") else 1.0,
        text_encoder=wire_float(spec.text_encoder_weight) if spec.HasField("text_encoder_weight") else None,
        unet=wire_float(spec.unet_weight) if spec.HasField("unet_weight") else None,
    )


def wire_float(value: float) -> float:
    """A float32 wire value as the shortest decimal that rounds to it."""
    return float(str(np.float32(value)))


def merge(message: generate_pb2.GenerateRequest) -> Merge:
    asked = message.merge
    return Merge.asked(asked.method, asked.density, asked.seed if asked.HasField("seed") else None)


def blend_merge(merge: Merge) -> generate_pb2.BlendMerge:
    """What ran: linear with density 0 and no seed; the seed only for DARE."""
    if merge.is_linear:
        return generate_pb2.BlendMerge(method="linear")
    seed = merge.seed if merge.method.startswith("dare") else None
    return generate_pb2.BlendMerge(method=merge.method, density=merge.density, seed=seed)


REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(asked: str) -> str:
    """The caller's request id (checked: it goes into log lines), else a new random one."""
    if not asked:
        return uuid.uuid4().hex[:16]
    if not REQUEST_ID.fullmatch(asked):
        raise InvalidArgument(
            f"request_id {asked[:40]!r} must be 1 to 128 letters, digits or . _ : - (it is logged as is)"
        )
    return asked


def image_format(message: generate_pb2.GenerateRequest) -> str:
    """``png`` or ``jpeg``; an ImageFormat value this server does not know is refused, not read as PNG."""
    try:
        return FORMAT_NAMES[message.format]
    except KeyError:
        known = ", ".join(f"{name} ({number})" for name, number in generate_pb2.ImageFormat.items())
        raise InvalidArgument(f"unknown ImageFormat {message.format}: use one of {known}") from None


def image(encoded: EncodedImage) -> generate_pb2.Image:
    return generate_pb2.Image(
        data=encoded.data,
        mime_type=encoded.mime_type,
        width=encoded.width,
        height=encoded.height,
        seed=encoded.seed,
    )


def timing(timings: Timings) -> generate_pb2.Timing:
    return generate_pb2.Timing(
        queue_ms=timings.queue_ms,
        swap_ms=timings.load_ms + timings.swap_ms,
        inference_ms=timings.inference_ms,
        total_ms=timings.total_ms,
    )


def image_chunks(index: int, encoded: EncodedImage, chunk_bytes: int):
    """GenerateStream messages carrying one image in pieces of at most ``chunk_bytes``."""
    total = len(encoded.data)
    offsets = range(0, total, chunk_bytes) if total else range(1)
    for offset in offsets:
        piece = encoded.data[offset : offset + chunk_bytes]
        yield generate_pb2.GenerateStreamResponse(
            image_chunk=generate_pb2.ImageChunk(
                index=index,
                offset=offset,
                data=piece,
                total_size=total,
                last=offset + chunk_bytes >= total,
                mime_type=encoded.mime_type,
                width=encoded.width,
                height=encoded.height,
                seed=encoded.seed,
            )
        )


def adapter_version(version) -> adapters_pb2.AdapterVersion:
    """An ``adapters.store.models.AdapterVersion`` on the wire."""
    metadata = version.metadata or {}
    file_metadata = metadata.get("file", {}) if isinstance(metadata, dict) else {}
    training = metadata.get("training", {}) if isinstance(metadata, dict) else {}
    return adapters_pb2.AdapterVersion(
        name=version.name,
        version=version.version,
        sha256=version.sha256,
        size_bytes=version.size_bytes,
        architecture=version.base_architecture,
        base_fingerprint=version.base_fingerprint,
        rank=version.rank,
        format=version.format,
        aliases=list(version.aliases),
        description=version.description,
        metadata={str(key): str(value) for key, value in dict(file_metadata).items()},
        created_at=version.created_at.timestamp() if version.created_at else 0.0,
        components=list(version.components),
        tags=list(version.tags),
        trigger_words=list(version.trigger_words),
        training_metadata_json=json.dumps(training, sort_keys=True, default=str),
    )


def resident_adapter(item) -> adapters_pb2.ResidentAdapter:
    return adapters_pb2.ResidentAdapter(
        name=item.name,
        version=item.version,
        sha256=item.sha256,
        size_bytes=item.size_bytes,
        pinned=item.pinned,
    )


def cache_stats(stats: EngineStats) -> adapters_pb2.CacheStats:
    return adapters_pb2.CacheStats(
        used_bytes=stats.used_bytes,
        capacity_bytes=stats.capacity_bytes,
        entries=stats.entries,
        hits=stats.hits,
        misses=stats.misses,
        evictions=stats.evictions,
        swaps=stats.swaps,
        plan_bytes=stats.plan_bytes,
        plan_capacity_bytes=stats.plan_capacity_bytes,
    )


def verify_report(report) -> adapters_pb2.VerifyStoreResponse:
    """An ``adapters.store.VerifyReport`` on the wire (leftover temp files as counts, not paths)."""
    removed = set(report.removed)
    return adapters_pb2.VerifyStoreResponse(
        checked=report.checked,
        damaged=[
            adapters_pb2.DamagedVersion(ref=item.ref, sha256=item.sha256, reason=item.reason)
            for item in report.damage
        ],
        orphans=[sha256 for sha256 in report.orphans if sha256 not in removed],
        partials=len(report.partials),
        removed=len(removed),
    )


def resident_list(listing: ResidentListing) -> adapters_pb2.ListResidentAdaptersResponse:
    return adapters_pb2.ListResidentAdaptersResponse(
        adapters=[resident_adapter(item) for item in listing.adapters], cache=cache_stats(listing.cache)
    )


def server_info(info: ServerInfo) -> server_pb2.ServerInfo:
    queue = info.queue
    return server_pb2.ServerInfo(
        version=info.version,
        base_model=server_pb2.BaseModel(
            name=info.base_name,
            source=info.base_source,
            architecture=info.architecture,
            fingerprint=info.fingerprint,
            resolution=info.resolution,
            family=info.family,
        ),
        backend=info.backend,
        precision=info.precision,
        device=info.device,
        dtype=info.dtype,
        limits=server_pb2.Limits(
            max_message_bytes=info.max_message_bytes,
            max_upload_bytes=info.max_upload_bytes,
            max_queue=info.max_queue,
            max_steps=info.limits.max_steps,
            max_images=info.limits.max_images,
            max_adapters=info.limits.max_adapters,
            max_size=info.limits.max_size,
            max_prompt_bytes=info.limits.max_prompt_bytes,
            max_rank=info.limits.max_rank,
            max_abs_weight=info.limits.max_abs_weight,
            max_input_pixels=info.limits.max_input_pixels,
        ),
        cache=cache_stats(info.cache),
        queue=server_pb2.QueueStats(
            queued=queue.queued,
            running=queue.running,
            completed=queue.completed,
            failed=queue.failed,
            cancelled=queue.cancelled,
            rejected=queue.rejected,
            deadline_exceeded=queue.deadline_exceeded,
            invalid=queue.invalid,
        ),
        ready=info.ready,
    )


def outcome(result: GenerateResult, request_id: str) -> dict[str, Any]:
    """The fields GenerateResponse and DoneEvent share: timing, blend, parameters and request id."""
    return {
        "timing": timing(result.timings),
        "blend_signature": result.blend_signature,
        "parameters": parameters(result.parameters),
        "request_id": request_id,
    }


def parameters(params: GenerationParameters) -> generate_pb2.GenerationParameters:
    return generate_pb2.GenerationParameters(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=params.width,
        height=params.height,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        seed=params.seed,
        sampler=params.sampler,
        num_images=params.num_images,
        merge=blend_merge(params.merge),
        strength=params.strength,
        init_image_sha256=params.init_image.sha256 if params.init_image else "",
        mask_image_sha256=params.mask.sha256 if params.mask else "",
        clip_skip=params.clip_skip,
        schedule=params.schedule,
        eta=params.eta,
        prompt_pieces=[
            generate_pb2.PromptPiece(text=text, weight=weight) for text, weight in params.prompt_pieces
        ],
        adapters=[
            generate_pb2.AppliedAdapter(
                name=item.name,
                version=item.version,
                sha256=item.sha256,
                weight=item.weight,
                text_encoder_weight=item.text_encoder_weight,
                unet_weight=item.unet_weight,
            )
            for item in params.adapters
        ],
    )
