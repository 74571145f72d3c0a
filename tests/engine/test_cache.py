from __future__ import annotations

import pytest

from adapters.errors import ResourceExhausted
from server.engine.cache import ByteLRU


def test_evicts_least_recently_used_by_bytes():
    cache: ByteLRU[str] = ByteLRU(100)
    cache.put("a", "A", 40)
    cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # now b is the least recently used
    assert cache.put("c", "C", 40) == ["b"]
    assert "b" not in cache and cache.used_bytes == 80
    assert (cache.hits, cache.misses, cache.evictions) == (1, 0, 1)
    assert cache.get("b") is None and cache.misses == 1


def test_a_large_entry_evicts_several():
    cache: ByteLRU[int] = ByteLRU(100)
    for index in range(5):
        cache.put(index, index, 20)
    assert cache.put("big", -1, 70) == [0, 1, 2, 3]
    assert cache.used_bytes == 90


def test_pinned_entries_are_never_evicted():
    cache: ByteLRU[str] = ByteLRU(100)
    cache.put("pinned", "P", 60, pin=True)
    cache.put("a", "A", 30)
    cache.get("pinned")
    cache.get("a")
    assert cache.put("b", "B", 30) == ["a"]
    assert "pinned" in cache
    with pytest.raises(ResourceExhausted):
        cache.put("c", "C", 50)  # only 40 bytes are not pinned
    assert "b" in cache and cache.used_bytes == 90  # a refused put changes nothing
    cache.pin("pinned", False)
    assert cache.put("c", "C", 50) == ["pinned"]


def test_replacing_keeps_the_pin_and_the_accounting():
    cache: ByteLRU[str] = ByteLRU(100)
    cache.put("a", "A", 30, pin=True)
    cache.put("a", "A2", 50)
    assert cache.is_pinned("a") and cache.used_bytes == 50 and cache.peek("a") == "A2"
    assert cache.pop("a") == "A2" and cache.used_bytes == 0 and len(cache) == 0


def test_make_room_evicts_the_least_recently_used_unpinned_and_hands_them_back():
    cache: ByteLRU[str] = ByteLRU(100)
    cache.put("pinned", "P", 30, pin=True)
    cache.put("a", "A", 30)
    cache.put("b", "B", 30)
    assert cache.make_room(10) == []  # 90 + 10 fit
    assert cache.make_room(40) == ["A"] and cache.used_bytes == 60 and cache.evictions == 1
    assert cache.make_room(100) == ["B"]  # as much as it can: the pinned one stays
    assert "pinned" in cache and cache.used_bytes == 30
