"""A least-recently-used cache bounded by bytes, not entries (adapter ranks differ), with pinning.

Not thread-safe on its own: the engine calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from adapters.errors import ResourceExhausted

V = TypeVar("V")


@dataclass
class _Entry(Generic[V]):
    value: V
    nbytes: int
    pinned: bool


class ByteLRU(Generic[V]):
    """Holds values up to ``capacity_bytes`` in all; evicts the least recently used unpinned ones.

    A value larger than what unpinned evictions can free is refused with
    ``ResourceExhausted`` rather than silently overshooting the budget.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Hashable, _Entry[V]] = OrderedDict()
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> V | None:
        """The value (now most recently used), counting a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry.value

    def nbytes_of(self, key: Hashable) -> int:
        """The bytes ``key`` holds (0 when it is not here)."""
        entry = self._entries.get(key)
        return 0 if entry is None else entry.nbytes

    def peek(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def put(self, key: Hashable, value: V, nbytes: int, *, pin: bool = False) -> list[Hashable]:
        """Insert (or replace) ``key``; returns the keys evicted to make room."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        old = self._entries.pop(key, None)
        if old is not None:
            self.used_bytes -= old.nbytes
            pin = pin or old.pinned
        pinned_bytes = sum(e.nbytes for e in self._entries.values() if e.pinned)
        if pinned_bytes + nbytes > self.capacity_bytes:
            if old is not None:  # put the old one back untouched
                self._entries[key] = old
                self.used_bytes += old.nbytes
            raise ResourceExhausted(
                f"adapter cache full: {nbytes} bytes needed, {self.capacity_bytes - pinned_bytes} of "
                f"{self.capacity_bytes} not pinned; unpin (unload) adapters or raise the cache size",
                retry_after_s=5.0,
            )
        evicted: list[Hashable] = []
        while self.used_bytes + nbytes > self.capacity_bytes:
            victim = next(k for k, e in self._entries.items() if not e.pinned)
            self.used_bytes -= self._entries.pop(victim).nbytes
            self.evictions += 1
            evicted.append(victim)
        self._entries[key] = _Entry(value, nbytes, pin)
        self.used_bytes += nbytes
        return evicted

    def make_room(self, nbytes: int) -> list[V]:
        """Evict least recently used unpinned values until ``nbytes`` more fit (or none is left to
        evict); returns the values evicted (their memory can be reused for the one coming)."""
        evicted: list[V] = []
        while self.used_bytes + nbytes > self.capacity_bytes:
            victim = next((k for k, e in self._entries.items() if not e.pinned), None)
            if victim is None:
                break
            entry = self._entries.pop(victim)
            self.used_bytes -= entry.nbytes
            self.evictions += 1
            evicted.append(entry.value)
        return evicted

    def pin(self, key: Hashable, pinned: bool = True) -> bool:
        entry = self._entries.get(key)
        if entry is None:
            return False
        entry.pinned = pinned
        return True

    def is_pinned(self, key: Hashable) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.pinned

    def pop(self, key: Hashable) -> V | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.used_bytes -= entry.nbytes
        return entry.value

    def items(self) -> Iterator[tuple[Hashable, V, int, bool]]:
        """``(key, value, nbytes, pinned)``, most recently used first."""
        for key, entry in reversed(self._entries.items()):
            yield key, entry.value, entry.nbytes, entry.pinned


MiB = 1 << 20
GiB = 1 << 30
# The plan cache's budget when none is given: this fraction of the memory left beside the base
# model's weights, between the two bounds (the floor is the older fixed default, a quarter of the
# adapter cache's default 512 MiB). 0.4: on a 24 GiB host an SDXL (bf16) blend's weights (5.8 GB)
# fit beside the factors of others, so switching between two blends only repoints (the second is
# kept by the scratch buffers); the fused design then holds W0 + one blend + the scratch.
PLAN_MEMORY_FRACTION = 0.4
PLAN_MIN_BYTES = 128 * MiB
PLAN_MAX_BYTES = 32 * GiB


def plan_budget_bytes(memory_bytes: int | None, model_bytes: int = 0, *, floor: int = PLAN_MIN_BYTES) -> int:
    """The blend-plan cache's budget on a device of ``memory_bytes`` (``None``: unknown, then
    ``floor``) that holds ``model_bytes`` of base weights: ``PLAN_MEMORY_FRACTION`` of the rest,
    at least ``floor``, at most ``PLAN_MAX_BYTES``. On the 24 GiB development machine: SD 1.5
    (4.3 GB in float32) 8.6 GB, six of its 2-adapter blends (1.4 GB each, materialized); SDXL in
    bfloat16 (6.9 GB) 7.5 GB, one blend's weights (5.8 GB) and the factors of others."""
    if memory_bytes is None:
        return floor
    share = int(max(0, memory_bytes - model_bytes) * PLAN_MEMORY_FRACTION)
    return max(floor, min(PLAN_MAX_BYTES, share))


def host_memory_bytes() -> int | None:
    """The memory this process may use on the host: the machine's RAM, or the container's limit
    (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``) when lower; ``None`` when unknown."""
    import os

    found: list[int] = []
    try:
        found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemTotal:"):
                        found.append(int(line.split()[1]) * 1024)
        except OSError:
            pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):  # "max" or a huge number: no limit
            found.append(int(text))
    found = [value for value in found if value > 0]
    return min(found) if found else None


# What a blend's weights may not take when kept: this share of the device's memory (at least
# PLAN_HEADROOM_MIN) stays free for generating (activations, a request's images, the runtime).
PLAN_HEADROOM_FRACTION = 0.15
PLAN_HEADROOM_MIN = 2 * GiB


def plan_headroom_bytes(memory_bytes: int | None) -> int:
    """The memory kept free beside kept blend weights on a device of ``memory_bytes``."""
    return max(PLAN_HEADROOM_MIN, int((memory_bytes or 0) * PLAN_HEADROOM_FRACTION))


def host_free_bytes() -> int | None:
    """The memory this process can still take on the host without swapping or an out-of-memory
    kill: ``MemAvailable`` (free plus reclaimable page cache), or what the container's limit
    leaves (cgroup v2 ``memory.max - memory.current``) when lower; ``None`` when unknown."""
    found: list[int] = []
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            text = limit.read().strip()
            if text.isdigit() and int(text) < (1 << 60):
                found.append(max(0, int(text) - int(used.read().strip())))
    except (OSError, ValueError):
        pass
    return min(found) if found else None
