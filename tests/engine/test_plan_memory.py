"""What the blend-plan cache holds, and when a blend's weights are kept (#22).

At SDXL size one blend's weights are 5.8 GB: a kept (materialized) blend lets go of its
factors, a new blend never evicts the one written now to make room for its own weights
(it goes to the scratch buffers, which keep it), a blend whose plan is cached is
switched to without reading its adapters again, and no weights are kept when the device
would be left without room to generate.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapters.errors import NotFound
from server.engine import GenerateRequest
from server.engine.cache import GiB, host_free_bytes, plan_headroom_bytes
from server.engine.plan import MATERIALIZED
from server.engine.types import ResolvedBlend
from tests.engine.conftest import make_engine

X = [("ink", 0.7), ("clay", 0.3)]
Y = [("ink", 0.4), ("clay", 0.6)]


def weights_of(engine) -> dict[str, torch.Tensor]:
    return {key: param.detach().clone() for key, param in engine._fused._params.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def plan_of(engine, blend):
    return engine._plans.peek(engine.resolve_blend(blend).signature)


def materialized_size(engine, blend) -> int:
    plan = plan_of(engine, blend)
    return sum(t.numel() * t.element_size() for t in plan.weights.values())


def test_a_kept_blend_lets_go_of_its_factors(micro_pipeline, micro_adapters):
    engine = make_engine(micro_pipeline, "micro", micro_adapters)
    engine.activate(X)
    plan = plan_of(engine, X)
    assert plan.weights is not None and plan.update_bytes == 0
    assert all(plan.updates[key] is MATERIALIZED for key in plan.weights)
    assert engine.stats().plan_bytes == materialized_size(engine, X)
    reference = make_engine(micro_pipeline, "micro", micro_adapters, plan_cache_bytes=0)
    reference.activate(X)  # written from the factors into scratch buffers
    assert same(weights_of(engine), weights_of(reference))


def test_a_new_blend_never_evicts_the_one_written_now(micro_pipeline, micro_adapters):
    """A budget for one blend's weights and another's factors: X is kept, Y goes to the
    scratch buffers, and every switch after the first round only repoints."""
    probe = make_engine(micro_pipeline, "micro", micro_adapters)
    probe.activate(X)
    weights = materialized_size(probe, X)
    probe.activate(Y)
    assert probe.stats().plan_bytes == 2 * weights  # the default budget keeps both
    prepared = [(probe._prepared(r), w) for r, w in probe.resolve_blend(Y).entries]
    factors = probe._fused.plan(prepared).update_bytes
    engine = make_engine(micro_pipeline, "micro", micro_adapters, plan_cache_bytes=weights + factors + 1)
    base = weights_of(engine)
    engine.activate(X)
    x_weights = weights_of(engine)
    engine.activate(Y)
    y_weights = weights_of(engine)
    assert plan_of(engine, X).weights is not None  # kept: not evicted for Y's weights
    assert plan_of(engine, Y).weights is None  # Y is in the scratch buffers
    for blend, expected in ((X, x_weights), (Y, y_weights), (X, x_weights), (Y, y_weights)):
        engine.activate(blend)
        assert engine._fused.written == 0  # repointed only
        assert same(weights_of(engine), expected)
    engine.activate([])
    assert same(weights_of(engine), base)


def unreadable(blend: ResolvedBlend) -> ResolvedBlend:
    """``blend`` with adapters that can no longer be read (their store lost them)."""

    def gone(_names):
        raise NotFound("the adapter's blob is gone")

    return ResolvedBlend.of(
        ((dataclasses.replace(resolved, loader=gone), weight) for resolved, weight in blend.entries),
        blend.merge,
    )


def test_a_cached_plan_is_switched_to_without_its_adapters(micro_pipeline, micro_adapters):
    engine = make_engine(micro_pipeline, "micro", micro_adapters)
    request = GenerateRequest("a fox", steps=2, seed=3, adapters=X)
    first = engine.generate(request)
    engine.activate(Y)
    job = engine.job(request)
    y = engine.resolve_blend(Y)
    misses = engine.stats().misses
    assert engine.unload("ink") and engine.unload("clay")  # out of the adapter cache
    lost = dataclasses.replace(job, blend=unreadable(job.blend))
    again = engine.generate(lost)
    assert again.timings.load_ms == 0.0
    assert engine.stats().misses == misses
    assert again.images[0].tobytes() == first.images[0].tobytes()
    assert engine.prefetch(unreadable(y)) == 0  # nothing to load for a cached plan
    engine.activate(unreadable(y))
    with pytest.raises(NotFound):  # a blend without a cached plan does read them
        engine.activate(unreadable(engine.resolve_blend([("ink", 0.1)])))


def test_no_weights_are_kept_without_room_to_generate(micro_pipeline, micro_adapters):
    full = make_engine(micro_pipeline, "micro", micro_adapters, free_memory=lambda: 0)
    roomy = make_engine(micro_pipeline, "micro", micro_adapters, free_memory=lambda: 64 * GiB)
    base = weights_of(full)
    for blend in (X, Y, X):
        full.activate(blend)
        roomy.activate(blend)
        assert same(weights_of(full), weights_of(roomy))
    assert plan_of(full, X).weights is None and plan_of(roomy, X).weights is not None
    assert full.stats().scratch_bytes > 0 and roomy.stats().scratch_bytes == 0
    full.activate([])
    assert same(weights_of(full), base)


def test_the_headroom_is_a_share_of_the_memory_with_a_floor():
    assert plan_headroom_bytes(None) == 2 * GiB
    assert plan_headroom_bytes(4 * GiB) == 2 * GiB
    assert plan_headroom_bytes(100 * GiB) == 15 * GiB
    free = host_free_bytes()
    assert free is not None and free > 0


def test_a_spare_slab_counts_as_memory_already_held(micro_pipeline, micro_adapters):
    """The headroom check counts only fresh memory: a blend whose weights fit a spare slab (an
    evicted blend's, the warm-up's) is kept even when the free memory alone would say no."""
    free = {"bytes": 64 * GiB}
    engine = make_engine(micro_pipeline, "micro", micro_adapters, free_memory=lambda: free["bytes"])
    engine.activate(X)
    size = materialized_size(engine, X)
    # Evict X (its slab becomes a spare) and go back to the base.
    engine.activate([])
    with engine._cache_lock:
        evicted = engine._plans.make_room(engine.plan_capacity_bytes)
    for plan in evicted:
        engine._fused.recycle(plan)
    assert engine._fused.reusable_bytes(size) == size
    free["bytes"] = engine._headroom + size // 2  # too little for fresh weights of this size
    engine.activate(X)
    assert plan_of(engine, X).weights is not None  # carved from the spare
    engine.activate(Y)  # no spare left: written into the scratch buffers
    assert plan_of(engine, Y).weights is None


def test_a_plan_evicted_between_the_load_and_the_swap_is_built_again(micro_pipeline, micro_adapters):
    """``_prepare_blend`` loads nothing for a cached plan; if another request evicts that plan
    before this one's swap, the swap loads the adapters itself (under the run lock)."""
    engine = make_engine(micro_pipeline, "micro", micro_adapters)
    reference = make_engine(micro_pipeline, "micro", micro_adapters, plan_cache_bytes=0)
    blend = engine.resolve_blend(X)
    engine.activate(X)
    engine.activate(Y)
    prepared, load_ms = engine._prepare_blend(blend)
    assert prepared is None and load_ms == 0.0  # cached: nothing loaded
    with engine._cache_lock:
        evicted = engine._plans.make_room(engine.plan_capacity_bytes)  # another request's doing
    for plan in evicted:
        engine._fused.recycle(plan)
    with engine._run_lock:
        engine._swap(blend, prepared)
    reference.activate(X)
    assert same(weights_of(engine), weights_of(reference))
