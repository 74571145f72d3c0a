"""Blend swaps hold their memory for good: 500 swaps after a warm-up leave RSS within 5 %.

The engine's caches are bounded by bytes (prepared adapters, blend plans): they fill during the
warm-up (budgets here are small so that a few dozen swaps fill them) and stay full, so what
the swaps that follow may add is a leak: tensors kept per swap, plans past the budget, scratch
buffers never freed. The swaps mix fresh blends (a new plan, an eviction), blends seen before
(a cached plan) and the base alone.
"""

from __future__ import annotations

import gc
import random

from tests.engine.conftest import ADAPTER_NAMES, make_engine
from tests.memory import rss_bytes

WARMUP_SWAPS = 60
SWAPS = 500
MAX_DRIFT = 0.05
CACHE_BYTES = 32 << 20
PLAN_BYTES = CACHE_BYTES // 4  # 8 MiB, a few dozen micro plans (the default is sized from the RAM)


def blends(seed: int):
    """An endless mix of blends, each unlike the one before: fresh ones, repeats of a small pool,
    and the base."""
    rng = random.Random(seed)

    def fresh():
        names = rng.sample(ADAPTER_NAMES, rng.randint(1, 3))
        return [(name, round(rng.uniform(-1.0, 1.0), 4)) for name in names]

    pool = [fresh() for _ in range(8)]
    previous: list = []  # the engine starts on the base
    while True:
        roll = rng.random()
        blend = [] if roll < 0.15 else rng.choice(pool) if roll < 0.45 else fresh()
        if blend != previous:  # the blend already in the weights is no swap
            yield blend
            previous = blend


def test_rss_stays_flat_over_500_blend_swaps(micro_pipeline, micro_adapters):
    engine = make_engine(
        micro_pipeline, "micro", micro_adapters, cache_bytes=CACHE_BYTES, plan_cache_bytes=PLAN_BYTES
    )
    swaps = blends(seed=7)
    for _ in range(WARMUP_SWAPS):
        engine.activate(next(swaps))
    gc.collect()
    start = rss_bytes()
    samples = []
    for index in range(1, SWAPS + 1):
        engine.activate(next(swaps))
        if index % 50 == 0:
            gc.collect()
            samples.append(rss_bytes())
    stats = engine.stats()
    assert stats.swaps == WARMUP_SWAPS + SWAPS
    assert stats.plan_bytes <= PLAN_BYTES and stats.used_bytes <= CACHE_BYTES
    drift = [(sample - start) / start for sample in samples]
    shown = ", ".join(f"{d:+.2%}" for d in drift)
    assert max(drift) < MAX_DRIFT, f"RSS from {start >> 20} MiB, every 50 swaps: {shown}"
