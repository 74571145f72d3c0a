from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

from adapters.canonical import LoraAdapter, LoraModule
from adapters.errors import (
    AdapterIncompatible,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from server.engine import Engine, GenerateRequest, MemoryResolver
from tests.engine.conftest import base_from, make_engine


def test_own_loop_gives_the_pipelines_images(micro_pipeline, micro_engine):
    request = GenerateRequest(
        "a castle on a hill", negative_prompt="fog", steps=4, seed=21, num_images=2, guidance_scale=6.0
    )
    result = micro_engine.generate(request)
    generators = [torch.Generator().manual_seed(seed) for seed in (21, 22)]
    reference = copy.deepcopy(micro_pipeline)(
        "a castle on a hill",
        negative_prompt="fog",
        num_inference_steps=4,
        num_images_per_prompt=2,
        guidance_scale=6.0,
        height=32,
        width=32,
        generator=generators,
    ).images
    assert [np.asarray(i).tobytes() for i in result.images] == [np.asarray(i).tobytes() for i in reference]
    assert result.parameters.seeds == (21, 22) and result.parameters.width == 32


def test_an_ancestral_sampler_matches_too(micro_pipeline, micro_engine):
    from diffusers import EulerAncestralDiscreteScheduler

    result = micro_engine.generate(GenerateRequest("a boat", steps=3, seed=4, sampler="euler_a"))
    reference = copy.deepcopy(micro_pipeline)
    reference.scheduler = EulerAncestralDiscreteScheduler.from_config(reference.scheduler.config)
    image = reference(
        "a boat", num_inference_steps=3, height=32, width=32, generator=[torch.Generator().manual_seed(4)]
    )
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(image.images[0]))


def test_result_reports_what_reproduces_it(micro_engine):
    first = micro_engine.generate(GenerateRequest("a tree <lora:ink:0.7>", steps=2, adapters=[("neon", 0.5)]))
    params = first.parameters
    assert params.prompt == "a tree"
    assert {(a.name, a.version, a.weight) for a in params.adapters} == {("ink", 1, 0.7), ("neon", 1, 0.5)}
    assert all(len(a.sha256) == 64 for a in params.adapters)
    again = micro_engine.generate(
        GenerateRequest(
            params.prompt,
            steps=params.steps,
            seed=params.seed,
            adapters=[(a.ref, a.weight) for a in params.adapters],
        )
    )
    assert again.blend_signature == first.blend_signature
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(first.images[0]))
    assert first.timings.denoise_ms > 0 and first.timings.decode_ms > 0


def test_prompt_tags_equal_explicit_adapters(micro_engine):
    tagged = micro_engine.generate(GenerateRequest("a tree <lora:ink:0.7>", steps=2, seed=3))
    explicit = micro_engine.generate(GenerateRequest("a tree", steps=2, seed=3, adapters=[("ink@1", 0.7)]))
    assert tagged.blend_signature == explicit.blend_signature
    assert np.array_equal(np.asarray(tagged.images[0]), np.asarray(explicit.images[0]))


def test_same_version_twice_sums_and_zero_weight_is_the_base(micro_engine):
    twice = micro_engine.generate(
        GenerateRequest("x", steps=1, seed=1, adapters=[("ink", 0.25), ("ink@1", 0.5)])
    )
    once = micro_engine.generate(GenerateRequest("x", steps=1, seed=1, adapters=[("ink", 0.75)]))
    assert twice.blend_signature == once.blend_signature
    base = micro_engine.generate(GenerateRequest("x", steps=1, seed=1, adapters=[("ink", 0.0)]))
    assert base.blend_signature == "" and base.parameters.adapters == ()


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "  "},
        {"width": 30},
        {"height": 4096},
        {"steps": 0},
        {"num_images": 9},
        {"guidance_scale": float("nan")},
        {"sampler": "magic"},
        {"adapters": [("ink", 99.0)]},
        {"adapters": [("", 1.0)]},
        {"negative_prompt": "<lora:ink:1>"},
    ],
)
def test_bad_requests_are_refused(micro_engine, change):
    request = GenerateRequest(**{"prompt": "a cat", "steps": 2, **change})
    with pytest.raises(InvalidArgument):
        micro_engine.generate(request)


def test_unknown_and_incompatible_adapters(micro_pipeline, micro_engine):
    with pytest.raises(NotFound):
        micro_engine.generate(GenerateRequest("a cat", steps=1, adapters=[("nobody", 1.0)]))
    with pytest.raises(NotFound):
        micro_engine.load("ink@7")
    wrong = LoraAdapter(
        modules={
            "unet.conv_in": LoraModule(down=torch.zeros(2, 4, 3, 3), up=torch.zeros(99, 2, 1, 1), alpha=2.0)
        }
    )
    micro_engine.resolver.add_adapter("wrong", wrong)
    with pytest.raises(AdapterIncompatible, match="wrong@1"):
        micro_engine.generate(GenerateRequest("a cat", steps=1, adapters=[("wrong", 1.0)]))
    assert micro_engine.blend_signature == ""  # nothing was half applied


def test_load_pin_unload_and_the_byte_bound(micro_pipeline, micro_adapters):
    resolver = MemoryResolver()
    for name, adapter in micro_adapters.items():
        resolver.add_adapter(name, adapter)
    probe = Engine(base_from(micro_pipeline, "micro"), resolver=resolver)
    sizes = {name: probe.load(name).size_bytes for name in micro_adapters}
    budget = sizes["ink"] + sizes["neon"] + sizes["clay"] // 2
    engine = Engine(base_from(micro_pipeline, "micro"), resolver=resolver, cache_bytes=budget)

    pinned = engine.load("ink", pin=True)
    assert pinned.pinned and pinned.size_bytes == sizes["ink"]
    engine.load("neon")
    engine.load("clay")  # evicts neon, never the pinned ink
    assert [a.name for a in engine.resident()] == ["clay", "ink"]
    assert engine.stats().evictions >= 1 and engine.stats().used_bytes <= budget
    engine.activate([("neon", 1.0)])  # a miss: loaded again on first use
    assert "neon" in [a.name for a in engine.resident()]
    assert engine.unload("ink") and not engine.unload("ink")
    assert "ink" not in [a.name for a in engine.resident()]
    stats = engine.stats()
    assert stats.misses >= 4 and stats.swaps == 1 and stats.capacity_bytes == budget

    small = Engine(base_from(micro_pipeline, "micro"), resolver=resolver, cache_bytes=sizes["ink"])
    small.load("ink", pin=True)
    with pytest.raises(ResourceExhausted):
        small.load("neon")


def test_prompts_are_bounded_in_bytes(micro_engine):
    limit = micro_engine.limits.max_prompt_bytes
    micro_engine.normalize(GenerateRequest("é" * (limit // 2), steps=1))  # 2 bytes each: at the limit
    for field in ("prompt", "negative_prompt"):
        asked = {"prompt": "a fox", field: "a" * (limit + 1)}
        with pytest.raises(InvalidArgument, match=f"{field} is {limit + 1} bytes"):
            micro_engine.normalize(GenerateRequest(**asked, steps=1))


def test_a_deadline_is_checked_before_the_text_encoder(micro_pipeline, micro_adapters):
    """A request whose deadline passes while it waits for the engine never reaches the encoder."""
    from server.engine.engine import BatchEntry

    engine = make_engine(micro_pipeline, "micro", micro_adapters)
    encoded: list[str] = []
    original = engine.pipeline.text_encoder.forward
    engine.pipeline.text_encoder.forward = lambda *a, **k: encoded.append("encode") or original(*a, **k)
    job = engine.job(GenerateRequest("a fox", steps=2, seed=1, deadline=time.monotonic() + 0.05))
    time.sleep(0.1)
    (outcome,) = engine.generate_batch([BatchEntry(job)])
    assert isinstance(outcome, DeadlineExceeded) and encoded == []


@pytest.mark.parametrize("failure", [torch.OutOfMemoryError("CUDA out of memory"), MemoryError()])
def test_out_of_memory_is_resource_exhausted_and_the_next_request_is_served(
    micro_pipeline, micro_adapters, failure
):
    from adapters.errors import OutOfMemory

    seam = {"fail": True}

    def step(index: int, total: int) -> None:
        if seam["fail"]:
            seam["fail"] = False
            raise failure

    engine = make_engine(micro_pipeline, "micro", micro_adapters, before_step=step)
    with pytest.raises(OutOfMemory, match="ran out of memory") as caught:
        engine.generate(GenerateRequest("a fox", steps=2, seed=1, adapters=[("ink", 1.0)]))
    assert isinstance(caught.value, ResourceExhausted) and caught.value.retry_after_s > 0
    assert caught.value.__context__ is None  # the failed run's frames (and tensors) are released
    assert engine.generate(GenerateRequest("a fox", steps=2, seed=1)).images


def test_a_rank_above_the_cap_is_refused_and_one_above_the_weights_dimensions_kept_dense(micro_pipeline):
    """LyCORIS' full preset puts its conv dim on SD's 4-channel conv_out: such a module is served,
    its update kept dense (fewer bytes than its factors); the server's cap still refuses."""
    from adapters.blend import prepare_module
    from adapters.canonical import LoraAdapter, LoraModule
    from adapters.errors import AdapterInvalid
    from adapters.validation import validate_against_base
    from server.models.shapes import module_shapes

    shapes = module_shapes(micro_pipeline)
    key, shape = next((k, s) for k, s in shapes.items() if len(s) == 2)
    small = min(shape)

    def adapter(rank: int) -> LoraAdapter:
        module = LoraModule(down=torch.zeros(rank, shape[1]), up=torch.zeros(shape[0], rank), alpha=1.0)
        return LoraAdapter(modules={key: module})

    validate_against_base(adapter(small + 1), shapes)
    assert prepare_module(adapter(small + 1).modules[key], shape).low_rank is None
    assert prepare_module(adapter(small // 2).modules[key], shape).low_rank is not None
    with pytest.raises(AdapterInvalid, match="limit of 2"):
        validate_against_base(adapter(3), shapes, max_rank=2)
