"""Guarantee (c): the fused engine computes what diffusers + PEFT compute unfused.

Both sides load the same adapter files (the engine through adapters.formats, the
peer through ``load_lora_weights``) and apply the same weights (``set_adapters``).
Stated tolerance: 1e-5 absolute on text-encoder and UNet outputs, 1e-4 on images
in [0, 1] (errors of the fused and the unfused sum compound over the steps).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from server.engine import Engine, MemoryResolver
from server.engine.denoise import denoise
from server.engine.synthetic import diffusers_file
from server.engine.types import GenerationSettings
from tests.engine.conftest import base_from

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")

BLEND = [("ink", 0.8), ("neon", -0.5), ("clay", 0.6)]


@pytest.fixture(scope="module")
def pair(micro_pipeline, micro_adapters, tmp_path_factory):
    folder = tmp_path_factory.mktemp("peer-files")
    resolver = MemoryResolver()
    peer = copy.deepcopy(micro_pipeline)
    for name, _ in BLEND:
        path = folder / f"{name}.safetensors"
        path.write_bytes(diffusers_file(micro_adapters[name], micro_pipeline))
        resolver.add_file(name, path)
        peer.load_lora_weights(str(path), adapter_name=name)
    peer.set_adapters([name for name, _ in BLEND], [weight for _, weight in BLEND])
    engine = Engine(base_from(micro_pipeline, "micro"), resolver=resolver)
    engine.activate(BLEND)
    return engine, peer


def test_text_encoder_matches(pair):
    engine, peer = pair
    ids = peer.tokenizer(["a red fox in the snow"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = engine.pipeline.text_encoder(ids)[0]
        theirs = peer.text_encoder(ids)[0]
        base = copy.deepcopy(peer)
        base.disable_lora()
        plain = base.text_encoder(ids)[0]
    assert (theirs - plain).abs().max() > 1e-3  # the adapters do change the text encoder
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_unet_matches(pair):
    engine, peer = pair
    generator = torch.Generator().manual_seed(0)
    config = peer.unet.config
    sample = torch.randn((2, config.in_channels, config.sample_size, config.sample_size), generator=generator)
    context = torch.randn((2, 77, config.cross_attention_dim), generator=generator)
    with torch.no_grad():
        ours = engine.pipeline.unet(sample, 500, encoder_hidden_states=context).sample
        theirs = peer.unet(sample, 500, encoder_hidden_states=context).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_images_match(pair):
    engine, peer = pair
    job = GenerationSettings("a red fox", "blurry", 32, 32, 4, 7.5, seed=5, sampler="default", num_images=2)
    ours = denoise(engine.pipeline, job, output_type="np").images
    generators = [torch.Generator().manual_seed(seed) for seed in job.seeds]
    theirs = peer(
        "a red fox",
        negative_prompt="blurry",
        height=32,
        width=32,
        num_inference_steps=4,
        num_images_per_prompt=2,
        generator=generators,
        output_type="np",
    ).images
    assert np.abs(ours - theirs).max() <= 1e-4
