"""Plain data the client hands back: no protobuf types leak out of ``server.client``.

``AppliedAdapter``, ``ResidentAdapter`` and ``QueueStats`` are the server's own records
(``server.records``), re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters.errors import InvalidArgument
from server.records import AppliedAdapter, QueueStats, ResidentAdapter

# How a blend's adapters combine (GenerateRequest.merge): the weighted sum, or PEFT's TIES and
# DARE merges of the dense per-module deltas. The same names as adapters.blend.MERGE_METHODS,
# which the client cannot import (torch).
MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a blend: a reference and a weight.

    A reference is ``name`` (the newest version), ``name@3`` (a version) or ``name@alias``.
    """

    ref: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        """Parse ``name[@version][:weight]``, e.g. ``style@2:0.8``."""
        text = text.strip()
        ref, weight = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep:
            try:
                weight = float(tail)
            except ValueError:
                raise InvalidArgument(
                    f"bad adapter weight {tail!r} in {text!r}: use name[@version][:weight], e.g. style@2:0.8"
                ) from None
            ref = head
        if not ref:
            raise InvalidArgument(f"empty adapter reference in {text!r}: use name[@version][:weight]")
        if ":" in ref:
            raise InvalidArgument(f"{text!r} has more than one ':weight': use name[@version][:weight]")
        return cls(ref=ref, weight=weight)


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


@dataclass(frozen=True)
class ResidentList:
    adapters: list[ResidentAdapter]
    cache: CacheStats


@dataclass(frozen=True)
class BaseModelInfo:
    name: str = ""
    source: str = ""
    architecture: str = ""
    fingerprint: str = ""
    resolution: int = 0


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 0
    max_upload_bytes: int = 0
    max_queue: int = 0
    max_steps: int = 0
    max_images: int = 0
    max_adapters: int = 0
    max_size: int = 0


@dataclass(frozen=True)
class ServerInfo:
    version: str
    base_model: BaseModelInfo
    backend: str
    device: str
    dtype: str
    limits: Limits
    cache: CacheStats
    queue: QueueStats
    ready: bool
