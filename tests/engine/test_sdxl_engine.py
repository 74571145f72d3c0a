"""The engine on SDXL and SD 2.x topologies: diffusers' images, every component swapped from
pristine weights, and the request features of SD 1.x (tags, batching, previews, deadlines)."""

from __future__ import annotations

import copy
import random
import time

import numpy as np
import pytest
import torch

from adapters.errors import DeadlineExceeded
from server.engine import GenerateRequest
from server.engine.engine import BatchEntry
from server.models.families import SD2, SDXL
from tests.engine.conftest import ADAPTER_NAMES, make_adapters, make_engine


def weights_of(pipeline, components) -> dict[str, torch.Tensor]:
    return {
        f"{component}.{key}": tensor.clone()
        for component in components
        for key, tensor in getattr(pipeline, component).state_dict().items()
    }


@pytest.fixture(scope="module")
def sdxl_adapters(tiny_sdxl_pipeline):
    return make_adapters(tiny_sdxl_pipeline)


@pytest.fixture()
def sdxl_engine(tiny_sdxl_pipeline, sdxl_adapters):
    return make_engine(tiny_sdxl_pipeline, "tiny-sdxl", sdxl_adapters)


def test_the_adapters_cover_both_text_encoders(sdxl_adapters):
    components = {key.split(".", 1)[0] for adapter in sdxl_adapters.values() for key in adapter.modules}
    assert components == {"unet", "text_encoder", "text_encoder_2"}


def test_the_engine_draws_what_diffusers_sdxl_pipeline_draws(tiny_sdxl_pipeline, sdxl_engine):
    assert sdxl_engine.family is SDXL and sdxl_engine.resolution == 64
    for negative in ("", "fog"):  # an empty negative prompt is zeros in SDXL, as diffusers does
        request = GenerateRequest("a castle", negative_prompt=negative, steps=3, seed=21, num_images=2)
        result = sdxl_engine.generate(request)
        reference = copy.deepcopy(tiny_sdxl_pipeline)(
            "a castle",
            negative_prompt=negative or None,
            num_inference_steps=3,
            num_images_per_prompt=2,
            guidance_scale=7.5,
            generator=[torch.Generator().manual_seed(seed) for seed in (21, 22)],
        ).images
        ours = [np.asarray(image).tobytes() for image in result.images]
        assert ours == [np.asarray(image).tobytes() for image in reference]


def test_swaps_on_all_three_components_leave_the_base_bit_identical(tiny_sdxl_pipeline, sdxl_engine):
    components = SDXL.weight_components
    fresh = weights_of(tiny_sdxl_pipeline, components)
    rng = random.Random(0)
    sdxl_engine.activate([("ink", 1.0)])
    after_a = weights_of(sdxl_engine.pipeline, components)
    changed = {key.split(".", 1)[0] for key in fresh if not torch.equal(after_a[key], fresh[key])}
    assert changed == {"unet", "text_encoder", "text_encoder_2"}
    for _ in range(40):
        names = rng.sample(ADAPTER_NAMES, rng.randint(1, 3))
        sdxl_engine.activate([(name, rng.choice((1.0, 0.5, -0.3))) for name in names])
    sdxl_engine.activate([("ink", 1.0)])
    again = weights_of(sdxl_engine.pipeline, components)
    assert [key for key in fresh if not torch.equal(again[key], after_a[key])] == []  # A -> ... -> A
    sdxl_engine.activate([])
    current = weights_of(sdxl_engine.pipeline, components)
    assert [key for key in fresh if not torch.equal(current[key], fresh[key])] == []


def test_tags_batches_and_previews_work_as_for_sd1(sdxl_engine):
    tagged = sdxl_engine.generate(GenerateRequest("a tree <lora:ink:0.7>", steps=2, seed=5))
    explicit = sdxl_engine.generate(GenerateRequest("a tree", steps=2, seed=5, adapters=[("ink", 0.7)]))
    assert np.array_equal(np.asarray(tagged.images[0]), np.asarray(explicit.images[0]))
    assert tagged.parameters.width == tagged.parameters.height == 64

    events = []
    jobs = [
        sdxl_engine.job(GenerateRequest("a tree", steps=2, seed=5, adapters=[("ink", 0.7)], preview_every=1)),
        sdxl_engine.job(GenerateRequest("a lake", steps=2, seed=9, adapters=[("ink", 0.7)])),
    ]
    results = sdxl_engine.generate_batch([BatchEntry(jobs[0], events.append), BatchEntry(jobs[1])])
    batched = np.asarray(results[0].images[0]).astype(int)
    assert np.abs(batched - np.asarray(explicit.images[0]).astype(int)).max() <= 1
    previews = [event.preview for event in events if event.preview is not None]
    assert len(previews) == 2 and previews[0].mode == "RGB"


def test_a_deadline_stops_an_sdxl_request(sdxl_engine):
    request = GenerateRequest("a tree", steps=2, seed=5, deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        sdxl_engine.generate(request)


def test_sd2_v_prediction_draws_what_diffusers_draws(tiny_sd2_pipeline):
    engine = make_engine(tiny_sd2_pipeline, "tiny-sd2", make_adapters(tiny_sd2_pipeline, 2))
    assert engine.family is SD2 and tiny_sd2_pipeline.scheduler.config.prediction_type == "v_prediction"
    result = engine.generate(GenerateRequest("a boat", steps=3, seed=4, adapters=[("ink", 0.8)]))
    reference = copy.deepcopy(engine.pipeline)  # holds the blend now
    image = reference("a boat", num_inference_steps=3, generator=[torch.Generator().manual_seed(4)]).images[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(image))
