"""Plain data the engine and the scheduler speak (no protobuf, no torch types in the API)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Defaults a request falls back to; the gRPC layer maps its "0 / unset" values here.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5
DEFAULT_SCHEDULER = "default"


@dataclass(frozen=True)
class Limits:
    """What one request must stay within (also reported by GetServerInfo)."""

    max_steps: int = 150
    max_images: int = 8
    max_adapters: int = 8
    max_size: int = 2048
    max_abs_weight: float = 10.0


@dataclass
class GenerateRequest:
    """One txt2img request.

    ``width``/``height`` of ``None`` mean the base model's resolution; ``seed`` of
    ``None`` means pick one (reported in the result). Image ``i`` uses ``seed + i``.
    ``adapters`` is the blend as ``(ref, weight)`` pairs; ``<lora:name:0.8>`` tags in
    the prompt are added to it and removed from the text. ``deadline`` is a
    ``time.monotonic()`` value; ``preview_every`` > 0 attaches a cheap preview to
    every n-th progress event.
    """

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    seed: int | None = None
    scheduler: str = DEFAULT_SCHEDULER
    num_images: int = 1
    adapters: list[tuple[str, float]] = field(default_factory=list)
    preview_every: int = 0
    deadline: float | None = None
    request_id: str = ""


@dataclass(frozen=True)
class AppliedAdapter:
    """One adapter of the blend a request ran under, resolved to an exact version."""

    name: str
    version: int
    sha256: str
    weight: float

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class GenerationParameters:
    """Exactly what was run: send these back (with the adapters' exact refs) to reproduce an image."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str
    num_images: int
    adapters: tuple[AppliedAdapter, ...]

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(self.seed + i for i in range(self.num_images))


@dataclass(frozen=True)
class Timings:
    """Where the time went, in milliseconds."""

    queue_ms: float = 0.0
    load_ms: float = 0.0
    swap_ms: float = 0.0
    encode_ms: float = 0.0
    denoise_ms: float = 0.0
    decode_ms: float = 0.0

    @property
    def inference_ms(self) -> float:
        return self.encode_ms + self.denoise_ms + self.decode_ms

    @property
    def total_ms(self) -> float:
        return self.queue_ms + self.load_ms + self.swap_ms + self.inference_ms


@dataclass(frozen=True)
class GenerateResult:
    """The images (PIL, in seed order), the parameters that made them, and the timings."""

    images: list[Any]
    parameters: GenerationParameters
    blend_signature: str
    timings: Timings


@dataclass(frozen=True)
class Progress:
    """A progress event: ``stage`` is ``"queued"`` (with ``queue_position``) or ``"step"``.

    ``step`` counts finished steps, 1..``total_steps``; ``preview`` is a small PIL
    image of the first image's current latents, when asked for.
    """

    stage: str
    queue_position: int = 0
    step: int = 0
    total_steps: int = 0
    preview: Any = None


@dataclass(frozen=True)
class ResidentAdapter:
    """One adapter version held in the engine's cache."""

    name: str
    version: int
    sha256: str
    size_bytes: int
    pinned: bool


@dataclass(frozen=True)
class EngineStats:
    """Cache and swap statistics since the engine started.

    ``used_bytes``/``capacity_bytes``/``entries``/``hits``/``misses``/``evictions``
    are the adapter cache's; ``plan_bytes`` is held by stacked blend factors and
    (including materialized blend weights); ``scratch_bytes`` by the buffers that
    blends too large to materialize are written into.
    """

    used_bytes: int
    capacity_bytes: int
    entries: int
    hits: int
    misses: int
    evictions: int
    swaps: int
    swap_ms_total: float
    swap_ms_last: float
    scratch_bytes: int
    plan_bytes: int
    blend_signature: str
