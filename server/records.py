"""Wire-shaped records the server and the client share (plain data: no torch, grpc or engine)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueueStats:
    """Generation requests since start, by outcome (the server's own warm-up and readiness-probe
    generations are not counted).

    ``rejected``: refused because the queue was full; ``cancelled``: cancelled by the client;
    ``deadline_exceeded``: stopped because the client's deadline passed; ``invalid``: refused
    with INVALID_ARGUMENT (a malformed request or adapter file); ``failed``: any other error.
    """

    queued: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    max_queue: int = 0  # most requests the queue holds
    deadline_exceeded: int = 0
    invalid: int = 0


@dataclass(frozen=True)
class AppliedAdapter:
    """One adapter of the blend a request ran under, resolved to an exact version.

    ``text_encoder_weight``/``unet_weight`` are set when the parts had different weights
    (``weight`` is then the UNet's); ``None``: both parts had ``weight``.
    """

    name: str
    version: int
    sha256: str
    weight: float
    text_encoder_weight: float | None = None
    unet_weight: float | None = None

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def parts(self) -> tuple[float, float]:
        """``(text encoder, UNet)`` weights."""
        te = self.weight if self.text_encoder_weight is None else self.text_encoder_weight
        unet = self.weight if self.unet_weight is None else self.unet_weight
        return te, unet

    @property
    def spec(self) -> str:
        """``name@version:weight`` (``name@version:te:unet`` with per-part weights), to send back
        for the same blend."""
        te, unet = self.parts
        if te == unet:
            return f"{self.name}@{self.version}:{te:g}"
        return f"{self.name}@{self.version}:{te:g}:{unet:g}"


@dataclass(frozen=True)
class ResidentAdapter:
    """One adapter version held in the engine's cache."""

    name: str
    version: int
    sha256: str
    size_bytes: int
    pinned: bool
