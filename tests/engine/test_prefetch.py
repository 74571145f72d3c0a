"""Loading queued requests' adapters while another request generates (#22).

The scheduler's prefetcher loads the adapters of the blends waiting in the queue into
the engine's cache while the running request denoises (held at its first step by a
turnstile seam here), so a request that waited does not pay its cold load.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest

from adapters.errors import InvalidArgument, Unavailable
from server.engine import Engine, GenerateRequest, MemoryResolver
from server.engine.scheduler import Scheduler
from server.engine.types import ResolvedAdapter
from tests.engine.conftest import base_from
from tests.engine.test_scheduler import Turnstile

SLOW_LOAD_S = 0.4


class SeamResolver:
    """A ``MemoryResolver`` whose loads are counted, and slowed or held on demand (a load seam)."""

    def __init__(self, adapters) -> None:
        self.inner = MemoryResolver()
        for name, adapter in adapters.items():
            self.inner.add_adapter(name, adapter)
        self.inner.add_bytes("broken", b"not a safetensors file")
        self.delay_s: dict[str, float] = {}
        self.started: dict[str, threading.Event] = {}
        self.loads: Counter[str] = Counter()
        self.lock = threading.Lock()

    def resolve(self, refs: Sequence[str]) -> list[ResolvedAdapter]:
        return [dataclasses.replace(r, loader=self._loader(r)) for r in self.inner.resolve(refs)]

    def invalidate(self, name: str | None = None) -> None:
        self.inner.invalidate(name)

    def _loader(self, resolved: ResolvedAdapter):
        def load(names):
            with self.lock:
                self.loads[resolved.name] += 1
            self.started.setdefault(resolved.name, threading.Event()).set()
            time.sleep(self.delay_s.get(resolved.name, 0.0))
            return resolved.loader(names)

        return load


@pytest.fixture()
def rig(micro_pipeline, micro_adapters):
    """(engine, resolver, turnstile, start): a micro engine behind a turnstile; ``start`` makes
    schedulers that are closed at the end."""
    turnstile = Turnstile()
    resolver = SeamResolver(micro_adapters)
    schedulers: list[Scheduler] = []

    def start(engine: Engine | None = None, **kwargs) -> Scheduler:
        scheduler = Scheduler(engine or default, **{"max_queue": 8, **kwargs})
        schedulers.append(scheduler)
        return scheduler

    def engine_with(**kwargs) -> Engine:
        return Engine(base_from(micro_pipeline, "micro"), resolver=resolver, before_step=turnstile, **kwargs)

    default = engine_with()
    start.engine_with = engine_with
    yield default, resolver, turnstile, start
    turnstile.release(100)
    for scheduler in schedulers:
        scheduler.close(drain=False, timeout=10)


def submit(scheduler: Scheduler, adapters, seed: int = 0):
    request = GenerateRequest("a fox", steps=1, seed=seed, adapters=adapters)
    return scheduler.submit(scheduler.engine.job(request))


def resident(engine: Engine) -> set[str]:
    return {adapter.name for adapter in engine.resident()}


def wait_for(condition, timeout: float = 15.0) -> None:
    ends = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < ends, "timed out"
        time.sleep(0.01)


def prefetch_idle(engine: Engine) -> bool:
    with engine._cache_lock:
        return not engine._loading


def test_a_queued_blend_is_loaded_while_another_generates(rig):
    engine, resolver, turnstile, start = rig
    resolver.delay_s["neon"] = SLOW_LOAD_S
    scheduler = start()
    first = submit(scheduler, [("ink", 1.0)])
    turnstile.wait_entered()  # A holds at its first step
    misses = engine.stats().misses
    second = submit(scheduler, [("neon", 0.5)])  # B: an adapter never loaded
    wait_for(lambda: "neon" in resident(engine))
    assert not first.done()  # loaded before A finished
    assert engine.stats().misses == misses + 1 and resolver.loads["neon"] == 1
    turnstile.release(2)
    a, b = first.result(timeout=60), second.result(timeout=60)
    assert a.images and b.images
    assert b.timings.load_ms < SLOW_LOAD_S * 1000 / 4, b.timings  # ~0: only cache lookups
    assert resolver.loads["neon"] == 1  # loaded once, by the prefetcher
    assert engine.stats().hits >= 1


def test_without_the_prefetcher_the_load_is_on_the_critical_path(rig):
    engine, resolver, turnstile, start = rig
    resolver.delay_s["neon"] = SLOW_LOAD_S
    scheduler = start(prefetch_blends=0)
    first = submit(scheduler, [("ink", 1.0)])
    turnstile.wait_entered()
    second = submit(scheduler, [("neon", 0.5)])
    time.sleep(0.2)
    assert "neon" not in resident(engine)
    turnstile.release(2)
    first.result(timeout=60)
    assert second.result(timeout=60).timings.load_ms >= SLOW_LOAD_S * 1000


def test_a_request_picked_during_its_prefetch_waits_for_that_load(rig):
    """The worker does not load an adapter a second time while the prefetcher is loading it."""
    _engine, resolver, turnstile, start = rig
    resolver.delay_s["neon"] = SLOW_LOAD_S
    scheduler = start()
    first = submit(scheduler, [("ink", 1.0)])
    turnstile.wait_entered()
    second = submit(scheduler, [("neon", 0.5)])
    assert resolver.started.setdefault("neon", threading.Event()).wait(10)
    turnstile.release(2)  # A ends while neon is still loading
    first.result(timeout=60)
    result = second.result(timeout=60)
    assert resolver.loads["neon"] == 1
    assert 0 < result.timings.load_ms < SLOW_LOAD_S * 1000 + 500


def test_a_broken_adapter_prefetch_breaks_nothing(rig, micro_pipeline, micro_adapters, caplog):
    engine, resolver, turnstile, start = rig
    # The proper error: what a fresh engine without a queue reports for it.
    alone = Engine(base_from(micro_pipeline, "micro"), resolver=SeamResolver(micro_adapters))
    with pytest.raises(InvalidArgument) as expected:
        alone.generate(GenerateRequest("a fox", steps=1, adapters=[("broken", 1.0)]))

    scheduler = start()
    caplog.set_level(logging.DEBUG, logger="server.engine.engine")
    first = submit(scheduler, [("ink", 1.0)])
    turnstile.wait_entered()
    broken = submit(scheduler, [("broken", 1.0)])
    after = submit(scheduler, [("clay", 0.7)])  # the prefetcher goes on past the broken one
    wait_for(lambda: "clay" in resident(engine) and resolver.loads["broken"] == 1)
    assert any("prefetch of broken@1 failed" in record.getMessage() for record in caplog.records)
    assert not first.done()
    turnstile.release(3)
    assert first.result(timeout=60).images
    with pytest.raises(InvalidArgument) as raised:
        broken.result(timeout=60)
    assert str(raised.value) == str(expected.value)
    assert resolver.loads["broken"] == 2  # the request's own load reported it
    assert after.result(timeout=60).images
    assert scheduler.stats().failed == 0 and scheduler.stats().invalid == 1


def test_cancelled_queued_requests_are_not_prefetched(rig):
    engine, resolver, turnstile, start = rig
    scheduler = start()
    first = submit(scheduler, [("ink", 1.0)])
    turnstile.wait_entered()
    gone = threading.Event()
    gone.set()
    request = GenerateRequest("a fox", steps=1, adapters=[("moss", 1.0)])
    cancelled = scheduler.submit(engine.job(request), cancel=gone)
    later = submit(scheduler, [("rust", 1.0)])
    wait_for(lambda: "rust" in resident(engine))
    assert resolver.loads["moss"] == 0
    turnstile.release(2)
    first.result(timeout=60)
    later.result(timeout=60)
    assert cancelled.exception(timeout=60) is not None


def test_a_prefetch_never_evicts_the_running_blends_adapters(rig, micro_adapters):
    engine, resolver, turnstile, start = rig
    sizes = {name: engine.load(name).size_bytes for name in ("ink", "neon")}
    small = start.engine_with(cache_bytes=sizes["ink"] + sizes["neon"] - 1)  # not both
    scheduler = start(small)
    first = submit(scheduler, [("ink", 1.0)])
    turnstile.wait_entered()
    loads = resolver.loads["neon"]
    second = submit(scheduler, [("neon", 0.5)])
    wait_for(lambda: resolver.loads["neon"] == loads + 1 and prefetch_idle(small))
    assert resident(small) == {"ink"}  # neon was loaded, then not kept
    assert small.stats().evictions == 0
    turnstile.release(2)
    assert first.result(timeout=60).images and second.result(timeout=60).images


def test_the_next_blends_are_prefetched_in_line_and_bounded(rig):
    engine, _resolver, turnstile, start = rig
    scheduler = start(prefetch_blends=2, max_group_skips=0)
    first = submit(scheduler, [("ink", 1.0)])
    turnstile.wait_entered()
    futures = [submit(scheduler, [(name, 1.0)]) for name in ("neon", "clay", "moss")]
    wait_for(lambda: {"neon", "clay"} <= resident(engine) and prefetch_idle(engine))
    time.sleep(0.2)
    assert "moss" not in resident(engine)  # the third blend in line waits its turn
    turnstile.release(1)  # A ends, neon runs (held): moss is now within the next two
    wait_for(lambda: "moss" in resident(engine))
    turnstile.release(10)
    for future in [first, *futures]:
        assert future.result(timeout=60).images


def test_engine_prefetch_skips_what_is_cached(micro_engine):
    blend = micro_engine.resolve_blend([("ink", 1.0), ("neon", 0.5)])
    assert micro_engine.prefetch(blend) == 2
    stats = micro_engine.stats()
    assert (stats.misses, stats.hits, stats.entries) == (2, 0, 2)
    assert micro_engine.prefetch(blend) == 0
    assert micro_engine.stats().hits == 0  # a prefetch counts no hits
    micro_engine.activate(blend)
    assert micro_engine.stats().hits == 2


def test_close_joins_the_prefetcher(rig):
    engine, resolver, turnstile, start = rig
    resolver.delay_s["neon"] = SLOW_LOAD_S
    scheduler = start()
    first = submit(scheduler, [("ink", 1.0)])
    turnstile.wait_entered()
    second = submit(scheduler, [("neon", 0.5)])
    assert resolver.started.setdefault("neon", threading.Event()).wait(10)  # a prefetch under way
    turnstile.release(1)  # A ends, or fails at its next stage (close stops what runs)
    assert scheduler.close(drain=False, timeout=10)
    assert scheduler.stopped and not scheduler._prefetcher.is_alive()
    assert prefetch_idle(engine)  # the load under way was waited for
    assert first.done()
    with pytest.raises(Unavailable):
        second.result(timeout=1)

    drained = start()
    assert drained.close(drain=True, timeout=10) and not drained._prefetcher.is_alive()


def test_a_b_a_with_prefetch_is_bit_exact(rig, micro_pipeline, micro_adapters):
    engine, _resolver, turnstile, start = rig
    scheduler = start(max_group_skips=0)  # FIFO: A, B, A
    a_blend, b_blend = [("ink", 1.0), ("clay", 0.5)], [("neon", 0.8), ("ink", -0.3)]
    futures = [submit(scheduler, a_blend, seed=5)]
    turnstile.wait_entered()
    futures += [submit(scheduler, b_blend, seed=5), submit(scheduler, a_blend, seed=5)]
    wait_for(lambda: {"ink", "clay", "neon"} <= resident(engine) and prefetch_idle(engine))
    turnstile.release(3)
    a1, b, a2 = (future.result(timeout=60) for future in futures)

    fresh = Engine(base_from(micro_pipeline, "micro"), resolver=SeamResolver(micro_adapters))
    alone_b = fresh.generate(GenerateRequest("a fox", steps=1, seed=5, adapters=b_blend))
    for left, right in zip(a1.images, a2.images, strict=True):
        assert np.array_equal(np.asarray(left), np.asarray(right))
    for left, right in zip(b.images, alone_b.images, strict=True):
        assert np.array_equal(np.asarray(left), np.asarray(right))
    assert not np.array_equal(np.asarray(a1.images[0]), np.asarray(b.images[0]))
