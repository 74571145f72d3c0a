"""Plain data the engine and the scheduler speak (no protobuf, no torch types in the API).

One request shape through the core: a caller's ``GenerateRequest`` is normalized
once (``server.engine.request.normalize``) into frozen ``GenerationSettings``,
adapter refs and ``RunOptions``; the refs are resolved once, off the engine
worker, into a ``ResolvedBlend`` whose ``signature`` is the one key for
grouping, the plan cache, the fused weights and the response.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from adapters.blend import LINEAR, Blend, Merge, PartWeights, Weight, add_weights, as_weight, is_zero
from adapters.canonical import LoraAdapter
from server.engine.images import SourceImage
from server.models.emphasis import parse_prompt_attention
from server.records import AppliedAdapter, QueueStats, ResidentAdapter
from server.settings import Limits

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_SAMPLER",
    "DEFAULT_STEPS",
    "AppliedAdapter",
    "EngineStats",
    "GenerateRequest",
    "GenerateResult",
    "GenerationParameters",
    "GenerationSettings",
    "Job",
    "Limits",
    "Progress",
    "QueueStats",
    "ResidentAdapter",
    "ResolvedAdapter",
    "ResolvedBlend",
    "RunOptions",
    "Timings",
]

# Defaults a request falls back to; the gRPC layer maps its "0 / unset" values here.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5
DEFAULT_SAMPLER = "default"
DEFAULT_SCHEDULE = "default"
DEFAULT_STRENGTH = 0.75  # with an init image and no strength: A1111's denoising_strength default


@dataclass
class GenerateRequest:
    """One generation request as a caller asks for it (txt2img, img2img, inpainting).

    ``width``/``height`` of ``None`` mean the base model's resolution; ``seed`` of
    ``None`` means pick one (reported in the result). Image ``i`` uses ``seed + i``.
    ``adapters`` is the blend as ``(ref, weight)`` pairs, a weight a float or ``PartWeights``
    (text encoder, UNet); ``<lora:name:0.8>`` / ``<lora:name:0.8:0.5>`` tags in the prompt
    are added to it and removed from the text; ``merge`` says how they
    combine. ``deadline`` is a ``time.monotonic()`` value; ``preview_every`` > 0
    attaches a cheap preview to every n-th progress event. ``init_image`` / ``mask_image`` are
    PNG or JPEG bytes (img2img, inpainting), ``strength`` the share of the schedule re-run
    (``None``: 0.75 with an init image, else 1), ``clip_skip`` A1111's (0 or 1: the last layer),
    ``schedule`` the sigma schedule and ``eta`` the sampler's stochasticity (``None``: 0).
    """

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    seed: int | None = None
    sampler: str = DEFAULT_SAMPLER
    num_images: int = 1
    adapters: list[tuple[str, Weight]] = field(default_factory=list)
    merge: Merge = LINEAR
    preview_every: int = 0
    deadline: float | None = None
    request_id: str = ""
    init_image: bytes | None = None
    mask_image: bytes | None = None
    strength: float | None = None
    clip_skip: int = 0
    schedule: str = DEFAULT_SCHEDULE
    eta: float | None = None


@dataclass(frozen=True)
class GenerationSettings:
    """What the images are drawn from, every default filled: the same settings and blend give
    the same images."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    sampler: str
    num_images: int
    strength: float = 1.0
    init_image: SourceImage | None = None
    mask: SourceImage | None = None
    clip_skip: int = 1
    schedule: str = DEFAULT_SCHEDULE
    eta: float = 0.0

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(self.seed + i for i in range(self.num_images))

    @property
    def batch_key(self) -> tuple:
        """What requests must share to be denoised in one batch (besides their blend)."""
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.sampler,
            self.schedule,
            self.eta,
            self.clip_skip,
            self.strength,
            self.init_image is not None,
            self.mask is not None,
        )


@dataclass(frozen=True)
class RunOptions:
    """How a request runs, not what it draws: deadline, previews, the id in the logs."""

    deadline: float | None = None
    preview_every: int = 0
    request_id: str = ""


@dataclass(frozen=True)
class ResolvedAdapter:
    """An exact adapter version; ``load()`` reads and parses it (done once, then cached by the engine).

    ``module_names`` (the base model's module keys) lets the parser map kohya names
    and both text-encoder spellings onto the base's modules.
    """

    name: str
    version: int
    sha256: str
    loader: Callable[[frozenset[str] | None], LoraAdapter] = field(repr=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def load(self, module_names=None) -> LoraAdapter:
        return self.loader(frozenset(module_names) if module_names is not None else None)


@dataclass(frozen=True)
class ResolvedBlend:
    """A blend resolved to exact versions: the same version named twice has its weights summed
    (part by part), zero weights are dropped. ``signature`` identifies the weights it produces."""

    entries: tuple[tuple[ResolvedAdapter, Weight], ...] = ()
    merge: Merge = LINEAR

    @classmethod
    def of(cls, pairs, merge: Merge = LINEAR) -> ResolvedBlend:
        """From ``(ResolvedAdapter, weight)`` pairs, in the order given (first naming wins)."""
        merged: dict[str, tuple[ResolvedAdapter, Weight]] = {}
        for resolved, weight in pairs:
            previous = merged.get(resolved.sha256)
            total = add_weights(previous[1], weight) if previous else as_weight(weight)
            merged[resolved.sha256] = (resolved, total)
        entries = tuple((r, w) for r, w in merged.values() if not is_zero(w))
        return cls(entries, merge if entries else LINEAR)

    @cached_property
    def signature(self) -> tuple[tuple[str, float], ...]:
        return Blend.of(((r.sha256, w) for r, w in self.entries), self.merge).signature

    @property
    def applied(self) -> tuple[AppliedAdapter, ...]:
        """The adapters as reported back, in signature order."""
        return tuple(sorted((_applied(r, w) for r, w in self.entries), key=lambda a: (a.sha256, a.weight)))


def _applied(resolved: ResolvedAdapter, weight: Weight) -> AppliedAdapter:
    if isinstance(weight, PartWeights):
        return AppliedAdapter(
            resolved.name,
            resolved.version,
            resolved.sha256,
            weight.unet,
            text_encoder_weight=weight.text_encoder,
            unet_weight=weight.unet,
        )
    return AppliedAdapter(resolved.name, resolved.version, resolved.sha256, float(weight))


@dataclass(frozen=True)
class Job:
    """A request ready for the queue: its settings, its resolved blend and how it runs."""

    settings: GenerationSettings
    blend: ResolvedBlend
    options: RunOptions = RunOptions()


@dataclass(frozen=True)
class GenerationParameters(GenerationSettings):
    """Exactly what was run: the settings plus the applied adapters and merge; send these back
    (with the adapters' exact refs) to reproduce an image."""

    adapters: tuple[AppliedAdapter, ...] = ()
    merge: Merge = LINEAR

    @classmethod
    def of(
        cls, settings: GenerationSettings, blend: ResolvedBlend, *, default_sampler: str = DEFAULT_SAMPLER
    ) -> GenerationParameters:
        """``default_sampler``: the name of the base model's own scheduler
        (``server.engine.sampler_names``), reported for a request that asked for ``default``."""
        values = {name: getattr(settings, name) for name in GenerationSettings.__dataclass_fields__}
        if values["sampler"] == DEFAULT_SAMPLER:
            values["sampler"] = default_sampler
        return cls(**values, adapters=blend.applied, merge=blend.merge)

    @property
    def prompt_pieces(self) -> tuple[tuple[str, float], ...]:
        """The prompt as the text encoder read it: A1111's emphasis pieces ``(text, weight)``, in
        order (``BREAK``: the piece ``("BREAK", -1.0)``); a plain prompt is one piece of weight 1."""
        return tuple(parse_prompt_attention(self.prompt))


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
    request_id: str = ""


@dataclass(frozen=True)
class Progress:
    """A progress event: ``stage`` is ``"queued"`` (with ``queue_position``) or ``"step"``.

    ``step`` counts finished steps, 1..``total_steps``; ``preview`` is a small PIL
    image of the first image's current latents, when asked for, and ``seed`` that image's seed.
    """

    stage: str
    queue_position: int = 0
    step: int = 0
    total_steps: int = 0
    preview: Any = None
    seed: int = 0


@dataclass(frozen=True)
class EngineStats:
    """Cache and swap statistics since the engine started.

    ``used_bytes``/``capacity_bytes``/``entries``/``hits``/``misses``/``evictions``
    are the adapter cache's; ``plan_bytes`` is held by blend plans (stacked factors
    or merged deltas, and materialized blend weights), of ``plan_capacity_bytes``; ``scratch_bytes`` by the
    buffers that blends too large to materialize are written into.
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
    plan_capacity_bytes: int = 0
