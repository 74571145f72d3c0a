"""Wire-shaped records the server and the client share (plain data: no torch, grpc or engine)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueueStats:
    """Scheduler counters since start (``rejected``: refused because the queue was full)."""

    queued: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    max_queue: int = 0  # most requests the queue holds


@dataclass(frozen=True)
class AppliedAdapter:
    """One adapter of the blend a request ran under, resolved to an exact version."""

    name: str
    version: int
    sha256: str
    weight: float

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def spec(self) -> str:
        """``name@version:weight``, to send back for the same blend."""
        return f"{self.name}@{self.version}:{self.weight:g}"


@dataclass(frozen=True)
class ResidentAdapter:
    """One adapter version held in the engine's cache."""

    name: str
    version: int
    sha256: str
    size_bytes: int
    pinned: bool
