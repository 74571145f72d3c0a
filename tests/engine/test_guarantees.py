"""Guarantees (a), (b) and (d) of the fused hot-swap; (c) is in test_peft_parity.py."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from server.engine import GenerateRequest
from server.engine.scheduler import Scheduler
from server.models.factory import build_pipeline
from tests.engine.conftest import ADAPTER_NAMES, make_engine

WEIGHTS = (1.0, 0.5, 0.8, -0.3, 0.25)


def random_blend(rng: random.Random) -> list[tuple[str, float]]:
    names = rng.sample(ADAPTER_NAMES, rng.randint(0, 3))
    return [(name, rng.choice(WEIGHTS)) for name in names]


def weights_of(pipeline) -> dict[str, torch.Tensor]:
    return {
        f"{component}.{key}": tensor
        for component in ("unet", "text_encoder", "vae")
        for key, tensor in getattr(pipeline, component).state_dict().items()
    }


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image) for image in result.images]


# Blends are swapped in either by repointing at materialized weights (the default)
# or, when the plan budget is too small to keep them, by writing scratch buffers.
PATHS = pytest.mark.parametrize("plan_cache_bytes", [None, 0], ids=["materialized", "scratch"])


@PATHS
def test_a_thousand_swaps_leave_the_base_bit_identical(micro_pipeline, micro_adapters, plan_cache_bytes):
    micro_engine = make_engine(micro_pipeline, "micro", micro_adapters, plan_cache_bytes=plan_cache_bytes)
    rng = random.Random(0)
    fresh = weights_of(build_pipeline("micro", seed=0))
    changed = 0
    for index in range(1000):
        micro_engine.activate(random_blend(rng))
        if index % 250 == 0:  # the swaps really do change the weights
            current = weights_of(micro_engine.pipeline)
            changed += sum(not torch.equal(current[k], fresh[k]) for k in fresh)
    assert changed > 0
    assert micro_engine.stats().swaps > 500
    micro_engine.activate([])
    current = weights_of(micro_engine.pipeline)
    assert current.keys() == fresh.keys()
    different = [key for key in fresh if not torch.equal(current[key], fresh[key])]
    assert different == []


@PATHS
def test_a_blend_after_any_history_equals_the_blend_on_a_fresh_engine(
    micro_pipeline, micro_adapters, plan_cache_bytes
):
    micro_engine = make_engine(micro_pipeline, "micro", micro_adapters, plan_cache_bytes=plan_cache_bytes)
    blend = [("neon", 0.8), ("ink", -0.3), ("rust", 0.5)]
    rng = random.Random(1)
    for _ in range(200):
        micro_engine.activate(random_blend(rng))
    micro_engine.activate([("neon", 1.0)])  # X's modules hold another blend right before X
    request = GenerateRequest(
        "a lighthouse at dusk", negative_prompt="blurry", steps=3, seed=11, adapters=blend
    )
    after_history = micro_engine.generate(request)

    fresh = make_engine(micro_pipeline, "micro", micro_adapters)
    on_fresh = fresh.generate(request)
    assert after_history.blend_signature == on_fresh.blend_signature != ""
    for left, right in zip(pixels(after_history), pixels(on_fresh), strict=True):
        assert np.array_equal(left, right)
    fresh_weights, history_weights = weights_of(fresh.pipeline), weights_of(micro_engine.pipeline)
    assert all(torch.equal(fresh_weights[k], history_weights[k]) for k in fresh_weights)
    base = fresh.generate(GenerateRequest("a lighthouse at dusk", negative_prompt="blurry", steps=3, seed=11))
    assert not np.array_equal(pixels(base)[0], pixels(on_fresh)[0])  # the blend matters


def test_interleaved_streams_never_see_each_others_weights(micro_pipeline, micro_adapters):
    blends = {"x": [("ink", 1.0), ("clay", 0.5)], "y": [("moss", 0.7), ("rust", -0.4)]}
    reference = make_engine(micro_pipeline, "micro", micro_adapters)
    seeds = range(4)
    expected = {
        (stream, seed): pixels(
            reference.generate(GenerateRequest("a fox", steps=2, seed=seed, adapters=blend))
        )
        for stream, blend in blends.items()
        for seed in seeds
    }
    signatures = {
        stream: reference.generate(GenerateRequest("a fox", steps=1, seed=0, adapters=blend)).blend_signature
        for stream, blend in blends.items()
    }

    engine = make_engine(micro_pipeline, "micro", micro_adapters)
    scheduler = Scheduler(engine, max_queue=32, max_group_skips=1)
    seen_wrong: list[str] = []
    futures: dict[tuple[str, int], object] = {}
    barrier = threading.Barrier(2)

    def stream(name: str) -> None:
        def check(progress) -> None:
            if progress.stage == "step" and engine.blend_signature != signatures[name]:
                seen_wrong.append(f"{name}: {engine.blend_signature} != {signatures[name]}")

        barrier.wait()
        for seed in seeds:
            request = GenerateRequest("a fox", steps=2, seed=seed, adapters=blends[name])
            futures[(name, seed)] = scheduler.submit(scheduler.engine.job(request), on_progress=check)

    threads = [threading.Thread(target=stream, args=(name,)) for name in blends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = {key: future.result(timeout=60) for key, future in futures.items()}
    scheduler.close(drain=True, timeout=10)

    assert seen_wrong == []
    for (name, seed), result in results.items():
        assert result.blend_signature == signatures[name]
        assert all(np.array_equal(a, b) for a, b in zip(pixels(result), expected[(name, seed)], strict=True))
