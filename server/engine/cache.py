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
