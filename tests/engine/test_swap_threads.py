"""Swaps at every size: the thread count chosen by the work, blend weights in one aligned slab,
scratch buffers not rewritten when they hold the blend already, the plan cache sized from the
machine's memory, and the warm-up swap."""

from __future__ import annotations

import pytest
import torch

from adapters.blend import Dense, LowRank, Rescaled
from server.engine import GenerateRequest
from server.engine.cache import (
    PLAN_MAX_BYTES,
    PLAN_MEMORY_FRACTION,
    PLAN_MIN_BYTES,
    host_memory_bytes,
    plan_budget_bytes,
)
from server.engine.engine import default_plan_budget
from server.engine.fuse import ALIGN_BYTES, FusedWeights
from server.engine.plan import PARALLEL_WORK, KernelThreads, threads_for, update_work
from server.models.factory import build_pipeline
from server.models.shapes import lora_targets
from tests.engine.conftest import make_engine

from .test_guarantees import weights_of

GiB = 1 << 30


# ------------------------------------------------------------------ the thread chooser


def test_small_kernels_run_on_one_thread_large_ones_on_the_callers_threads():
    # SD 1.5's shapes, a 2-adapter rank-32 blend (stacked rank 64).
    small = 320 * 320 * 65  # 6.7e6 multiply-adds
    large = 1280 * 1280 * 65  # 1.1e8
    assert threads_for(32 * 32 * 9, 8) == 1  # a tiny model's update
    assert threads_for(small, 8) == 1
    assert threads_for(large, 8) == 8
    assert threads_for(large, 2) == 2
    assert threads_for(large, 1) == 1  # never more than the caller runs with
    assert threads_for(3 * PARALLEL_WORK, 8) == 3  # one thread per PARALLEL_WORK of work
    assert threads_for(PARALLEL_WORK - 1, 8) == 1
    assert threads_for(10, 4, parallel_work=1) == 4


def test_update_work_counts_multiply_adds():
    low = LowRank(torch.zeros(64, 1280), torch.zeros(1280, 64))
    assert update_work(1280, 1280, low) == 1280 * 1280 * 65
    assert update_work(10, 20, Dense(torch.zeros(10, 20))) == 400
    assert update_work(10, 20, Rescaled(Dense(torch.zeros(10, 20)), torch.ones(10, 1))) == 600
    assert update_work(10, 20, None) == 200


def test_kernel_threads_follow_the_work_and_give_the_callers_count_back():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with KernelThreads() as threads:
            threads.fit(10)
            assert torch.get_num_threads() == 1
            threads.fit(1280 * 1280 * 65)
            assert torch.get_num_threads() == 2
            threads.fit(0)
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------ the fused weights


@pytest.fixture()
def own_micro(micro_pipeline):
    import copy

    return copy.deepcopy(micro_pipeline)


def _plans(fused: FusedWeights, adapters):
    """Two blends' plans: ink + neon (neon also has LoCon convolutions), and clay alone."""
    prepared = {
        name: fused.prepare(adapter, name=name, version=1, sha256=name) for name, adapter in adapters.items()
    }
    a = fused.plan([(prepared["ink"], 1.0), (prepared["neon"], 0.5)])
    b = fused.plan([(prepared["clay"], 0.8)])
    return a, b


@pytest.mark.parametrize("materialized", [True, False], ids=["materialized", "scratch"])
def test_a_b_a_on_every_thread_count_is_bit_exact(own_micro, micro_adapters, materialized):
    """Every kernel on torch's pool (threshold 1), two threads: the base comes back bit for bit
    and each blend's weights equal those computed on one thread."""
    fresh = weights_of(build_pipeline("micro", seed=0))
    reference = FusedWeights(lora_targets(own_micro))
    ref_a, ref_b = _plans(reference, micro_adapters)
    reference.materialize(ref_a)
    reference.materialize(ref_b)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fused = FusedWeights(lora_targets(own_micro), parallel_work=1)
        plan_a, plan_b = _plans(fused, micro_adapters)
        if materialized:
            fused.materialize(plan_a)
            fused.materialize(plan_b)
        for plan, ref in ((plan_a, ref_a), (plan_b, ref_b), (plan_a, ref_a)):
            assert fused.apply(plan) > 0
            params = dict(fused._params)
            for key in plan.updates:
                torch.testing.assert_close(params[key].data, ref.weights[key], rtol=0, atol=1e-6)
        assert torch.get_num_threads() == 2  # the caller's count, given back
        fused.apply(None)
    finally:
        torch.set_num_threads(previous)
    current = weights_of(own_micro)
    assert [key for key in fresh if not torch.equal(current[key], fresh[key])] == []


def test_blend_weights_are_aligned_views_of_one_allocation(own_micro, micro_adapters):
    fused = FusedWeights(lora_targets(own_micro))
    plan, _ = _plans(fused, micro_adapters)
    fused.materialize(plan)
    storages = {tensor.untyped_storage().data_ptr() for tensor in plan.weights.values()}
    assert len(storages) == 1
    for key, tensor in plan.weights.items():
        assert tensor.is_contiguous() and tensor.data_ptr() % ALIGN_BYTES == 0, key
        assert tensor.shape == fused._pristine[key].shape
    fused.apply(None)  # the scratch path too
    fused.apply(_plans(fused, micro_adapters)[0])
    scratch = {fused._scratch[key].untyped_storage().data_ptr() for key in plan.updates}
    assert len(scratch) == 1 and all(fused._scratch[k].data_ptr() % ALIGN_BYTES == 0 for k in plan.updates)


def test_a_scratch_buffer_holding_the_blend_is_repointed_not_rewritten(own_micro, micro_adapters):
    fused = FusedWeights(lora_targets(own_micro))
    plan_a, plan_b = _plans(fused, micro_adapters)
    fused.apply(plan_a)
    assert fused.written == len(plan_a.updates)
    values = {key: fused._scratch[key].clone() for key in plan_a.updates}
    fused.apply(None)
    assert fused.apply(plan_a) == len(plan_a.updates)  # every module changed again...
    assert fused.written == 0  # ...by repointing at what its buffer still holds
    fused.apply(plan_b)  # B rewrites the buffers of the modules it shares with A
    fused.apply(plan_a)
    shared = plan_a.updates.keys() & plan_b.updates.keys()
    assert shared and fused.written == len(shared)
    for key in plan_a.updates:
        assert torch.equal(fused._params[key].data, values[key])
    fused.apply(None)


# ------------------------------------------------------------------ the plan cache's size


def test_the_plan_budget_is_a_bounded_share_of_the_memory_beside_the_model():
    assert plan_budget_bytes(24 * GiB, 4 * GiB) == int(20 * GiB * PLAN_MEMORY_FRACTION)
    assert plan_budget_bytes(None) == PLAN_MIN_BYTES
    assert plan_budget_bytes(None, floor=7) == 7
    assert plan_budget_bytes(1 * GiB, 1 * GiB) == PLAN_MIN_BYTES  # nothing left: the floor
    assert plan_budget_bytes(1 << 50) == PLAN_MAX_BYTES
    memory = host_memory_bytes()
    assert memory is None or memory > 64 << 20


def test_an_engine_without_a_plan_budget_sizes_it_from_the_memory(micro_pipeline, micro_adapters):
    engine = make_engine(micro_pipeline, "micro", micro_adapters)
    expected = default_plan_budget(engine.base, 512 << 20)
    assert engine.plan_capacity_bytes == expected == engine.stats().plan_capacity_bytes
    assert expected >= (512 << 20) // 4
    memory = host_memory_bytes()
    if memory is not None:
        assert expected == plan_budget_bytes(memory, _model_bytes(engine.pipeline), floor=128 << 20)
    given = make_engine(micro_pipeline, "micro", micro_adapters, plan_cache_bytes=12345)
    assert given.plan_capacity_bytes == 12345


def _model_bytes(pipeline) -> int:
    return sum(
        p.numel() * p.element_size()
        for component in ("unet", "vae", "text_encoder")
        for p in getattr(pipeline, component).parameters()
    )


# ------------------------------------------------------------------ warm-up


@pytest.mark.parametrize("plan_cache_bytes", [None, 0], ids=["materialized", "scratch"])
def test_the_warm_up_swap_leaves_nothing_but_a_warm_engine(micro_pipeline, micro_adapters, plan_cache_bytes):
    fresh = weights_of(build_pipeline("micro", seed=0))
    cold = make_engine(micro_pipeline, "micro", micro_adapters, plan_cache_bytes=plan_cache_bytes)
    warm = make_engine(micro_pipeline, "micro", micro_adapters, plan_cache_bytes=plan_cache_bytes)
    assert warm.warm_up() > 0
    stats = warm.stats()
    assert (stats.entries, stats.plan_bytes, stats.swaps, stats.blend_signature) == (0, 0, 0, "")
    assert (stats.scratch_bytes > 0) == (plan_cache_bytes == 0)  # kept for the next large blend
    current = weights_of(warm.pipeline)
    assert [key for key in fresh if not torch.equal(current[key], fresh[key])] == []
    blend = [("ink", 1.0), ("neon", -0.5)]
    request = GenerateRequest("a fox", steps=2, seed=3, adapters=blend)
    assert warm.generate(request).images[0].tobytes() == cold.generate(request).images[0].tobytes()
    warm.activate(blend)
    assert warm.warm_up() > 0  # over a blend: the base after it, and the blend back on request
    assert warm.blend_signature == ""
    assert warm.generate(request).images[0].tobytes() == cold.generate(request).images[0].tobytes()


# ------------------------------------------------------------------ memory reused


def _slab_of(plan) -> int:
    return next(iter(plan.weights.values()))._base.data_ptr()


def test_a_dropped_blends_memory_is_reused_unless_in_use(own_micro, micro_adapters):
    fused = FusedWeights(lora_targets(own_micro))
    first, _ = _plans(fused, micro_adapters)
    fused.materialize(first)
    fused.apply(first)
    in_use = _slab_of(first)
    fused.recycle(first)  # its weights are the ones in the model: not reusable
    second, never_materialized = _plans(fused, micro_adapters)
    fused.materialize(second)
    assert _slab_of(second) != in_use
    fused.recycle(never_materialized)  # nothing to keep
    fused.apply(None)
    free = _slab_of(second)
    fused.recycle(second)  # no weight points into it now
    assert second.weights is None
    third, _ = _plans(fused, micro_adapters)
    fused.materialize(third)  # carved from second's memory, every value written anew
    assert _slab_of(third) == free
    reference = FusedWeights(lora_targets(build_pipeline("micro", seed=0)))
    expected, _ = _plans(reference, micro_adapters)
    reference.materialize(expected)
    assert all(torch.equal(third.weights[key], expected.weights[key]) for key in expected.updates)
    fused.apply(third)
    assert fused.apply(None) == len(third.updates)


def test_an_engine_reuses_an_evicted_blends_memory(micro_pipeline, micro_adapters):
    probe = make_engine(micro_pipeline, "micro", micro_adapters)
    x, y, z = [("ink", 1.0)], [("ink", 0.5)], [("ink", -0.5)]  # the same modules: the same size
    probe.activate(x)
    one = probe.stats().plan_bytes
    engine = make_engine(micro_pipeline, "micro", micro_adapters, plan_cache_bytes=2 * one + one // 2)
    engine.activate(x)
    slab_x = engine._plans.peek(engine.resolve_blend(x).signature).weights
    ptr_x = next(iter(slab_x.values()))._base.data_ptr()
    engine.activate(y)
    engine.activate(z)  # evicts x (not in use), whose memory z takes
    plan_z = engine._plans.peek(engine.resolve_blend(z).signature)
    assert next(iter(plan_z.weights.values()))._base.data_ptr() == ptr_x
    assert engine.resolve_blend(x).signature not in engine._plans
    assert engine.stats().plan_bytes <= engine.plan_capacity_bytes
    fresh = make_engine(micro_pipeline, "micro", micro_adapters)
    request = GenerateRequest("a fox", steps=2, seed=3, adapters=z)
    assert engine.generate(request).images[0].tobytes() == fresh.generate(request).images[0].tobytes()


# ------------------------------------------------------------------ real sizes (topology only)


def test_the_real_size_sd15_has_the_264_modules_a_kohya_lora_trains():
    """The benchmark's SD 1.5 (exact configs) on the meta device: no memory, only shapes."""
    import math

    from server.engine.synthetic import kohya_targets
    from server.models.factory import build_real_size
    from server.models.shapes import module_shapes

    pipeline = build_real_size("sd15", device="meta")
    shapes = module_shapes(pipeline)
    targets = kohya_targets(shapes)
    assert len(targets) == 264
    assert sum(key.startswith("text_encoder.") for key in targets) == 72
    assert sum(math.prod(shapes[key]) for key in targets) == 351_911_936  # 1.4 GB in float32
    assert sum(p.numel() for p in pipeline.unet.parameters()) == 859_520_964
