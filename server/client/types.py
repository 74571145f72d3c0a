"""Plain data the client hands back: no protobuf types leak out of ``server.client``.

``AppliedAdapter``, ``ResidentAdapter`` and ``QueueStats`` are the server's own records
(``server.records``), re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters.errors import InvalidArgument
from adapters.weights import PartWeights, parse_weights
from server.records import AppliedAdapter, QueueStats, ResidentAdapter

# How a blend's adapters combine (GenerateRequest.merge): the weighted sum, or PEFT's TIES and
# DARE merges of the dense per-module deltas. The same names as adapters.blend.MERGE_METHODS,
# which the client cannot import (torch).
MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a blend: a reference and a weight, optionally one per part of the model.

    A reference is ``name`` (the newest version), ``name@3`` (a version) or ``name@alias``.
    ``text_encoder_weight``/``unet_weight`` (A1111's ``<lora:name:te:unet>``) override
    ``weight`` on the text encoder(s) / the UNet; ``None``: ``weight``.
    """

    ref: str
    weight: float = 1.0
    text_encoder_weight: float | None = None
    unet_weight: float | None = None

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        """Parse ``name[@version][:weight]``, e.g. ``style@2:0.8``, or with per-part weights
        ``style:0.8:0.5`` (text encoder, UNet) and ``style:te=0.8:unet=0.5`` (A1111's rules: a
        part not given takes the text-encoder weight)."""
        text = text.strip()
        ref, sep, rest = text.partition(":")
        if not ref:
            raise InvalidArgument(f"empty adapter reference in {text!r}: use name[@version][:weight]")
        if not sep:
            return cls(ref=ref)
        try:
            weight = parse_weights(rest.split(":"), f"adapter {text!r}")
        except InvalidArgument as error:
            raise InvalidArgument(
                f"bad adapter weight in {text!r}: use name[@version][:weight], e.g. style@2:0.8, or "
                f"name:TE:UNET / name:te=0.8:unet=0.5 ({error})"
            ) from None
        if isinstance(weight, PartWeights):
            return cls(ref, weight.unet, text_encoder_weight=weight.text_encoder, unet_weight=weight.unet)
        return cls(ref=ref, weight=weight)

    @property
    def parts(self) -> tuple[float, float]:
        """``(text encoder, UNet)`` weights."""
        te = self.weight if self.text_encoder_weight is None else self.text_encoder_weight
        unet = self.weight if self.unet_weight is None else self.unet_weight
        return te, unet


@dataclass(frozen=True)
class Image:
    """An encoded image (PNG or JPEG bytes) and what made it."""

    data: bytes
    mime_type: str
    width: int
    height: int
    seed: int

    def save(self, path) -> None:
        from pathlib import Path

        Path(path).write_bytes(self.data)


@dataclass(frozen=True)
class Timing:
    queue_ms: float = 0.0
    swap_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class Parameters:
    """Exactly what ran (defaults filled in); pass them back to reproduce the images."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    guidance_scale: float = 0.0
    seed: int = 0
    sampler: str = ""
    num_images: int = 0
    adapters: tuple[AppliedAdapter, ...] = ()
    merge: str = "linear"  # how the adapters combined: one of MERGE_METHODS
    density: float = 0.0  # the fraction of each delta ties and dare_* kept; 0 for linear
    merge_seed: int | None = None  # the seed of dare_*'s random masks; None for the others
    strength: float = 0.0  # img2img/inpainting: the share of the schedule re-run (1: txt2img)
    init_image_sha256: str = ""  # of the init image / mask bytes sent ("" when none)
    mask_image_sha256: str = ""
    clip_skip: int = 0  # A1111's numbering: 1 = the last text-encoder layer
    schedule: str = ""  # the sigma schedule ("default": the sampler's own)
    eta: float = 0.0
    # The prompt as the text encoder read it: (text, emphasis weight) pieces in order, A1111's
    # "(word:1.3)", "(word)" = 1.1, "[word]" = 1/1.1; BREAK is the piece ("BREAK", -1.0).
    prompt_pieces: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class GenerateResult:
    images: list[Image]
    timing: Timing
    blend_signature: str = ""
    parameters: Parameters = field(default_factory=Parameters)
    request_id: str = ""  # the caller's, or the one the server assigned (in its log lines)


@dataclass(frozen=True)
class Queued:
    """Stream event: ``position`` requests are ahead of this one."""

    position: int


@dataclass(frozen=True)
class Progress:
    """Stream event: ``step`` of ``total_steps`` done; ``preview`` when previews were asked for."""

    step: int
    total_steps: int
    preview: Image | None = None


@dataclass(frozen=True)
class ImageReady:
    """Stream event: image ``index`` is complete (its chunks reassembled)."""

    index: int
    image: Image


@dataclass(frozen=True)
class Done:
    """Stream event: the last one; ``result`` holds every image."""

    result: GenerateResult


StreamEvent = Queued | Progress | ImageReady | Done


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter version in the store."""

    name: str
    version: int
    sha256: str
    size_bytes: int
    architecture: str = ""
    base_fingerprint: str = ""
    rank: int = 0
    format: str = ""
    aliases: tuple[str, ...] = ()
    description: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    components: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    trigger_words: tuple[str, ...] = ()
    training_metadata: dict = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class AdapterPage:
    adapters: list[AdapterInfo]
    next_page_token: str = ""


@dataclass(frozen=True)
class CacheStats:
    used_bytes: int = 0
    capacity_bytes: int = 0
    entries: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    swaps: int = 0
    # The blend cache (materialized blends, kept apart from the adapters): bytes held and its budget.
    plan_bytes: int = 0
    plan_capacity_bytes: int = 0


@dataclass(frozen=True)
class ResidentList:
    adapters: list[ResidentAdapter]
    cache: CacheStats


@dataclass(frozen=True)
class DamagedVersion:
    """A stored version the server cannot serve: ``reason`` is ``missing``, ``sha256_mismatch``
    or ``undecodable``."""

    ref: str
    sha256: str
    reason: str


@dataclass(frozen=True)
class StoreReport:
    """What VerifyStore found: ``damaged`` versions (sorted by ref), leftover ``orphans``
    (sha256s) and ``partials`` (temp files), and how many leftovers a repair ``removed``."""

    checked: int
    damaged: list[DamagedVersion] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    partials: int = 0
    removed: int = 0

    @property
    def ok(self) -> bool:
        return not self.damaged


@dataclass(frozen=True)
class BaseModelInfo:
    name: str = ""
    source: str = ""
    architecture: str = ""
    fingerprint: str = ""
    resolution: int = 0
    family: str = ""


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 0
    max_upload_bytes: int = 0
    max_queue: int = 0
    max_steps: int = 0
    max_images: int = 0
    max_adapters: int = 0
    max_size: int = 0
    max_prompt_bytes: int = 0
    max_rank: int = 0
    max_abs_weight: float = 0.0
    max_input_pixels: int = 0


@dataclass(frozen=True)
class ServerInfo:
    """What GetServerInfo reports: ``backend`` is the plain name (torch, onnxruntime, openvino,
    tensorrt), ``precision`` what it computes in (fp32, fp16, bf16), ``dtype`` the weights' dtype."""

    version: str
    base_model: BaseModelInfo
    backend: str
    device: str
    dtype: str
    limits: Limits
    cache: CacheStats
    queue: QueueStats
    ready: bool
    precision: str = ""
