"""The shipped ``toy`` model: it loads as a built-in name and draws what the prompt asks (fast subset)."""

from __future__ import annotations

import pytest

from server.models.loader import BUILTIN_FOLDERS, builtin_models, load_base_model
from server.models.toy.evaluate import pipeline_generator, score

# The fast subset: 16 images at 10 steps, default guidance. The full check (200 images, 20 steps)
# is `python -m bench quality`. The shipped weights score color 97 %, shape 85.5 % over 200 images at
# 20 steps (chance: 17 % / 20 %); here they score 29 hits of 32 (15 colors + 14 shapes), the
# previous, under-trained weights 9 and the untrained factory "toy" 3. The floor leaves 5 hits of
# margin for float differences between CPUs.
FAST_COUNT = 16
FAST_STEPS = 10
HITS_FLOOR = 24


@pytest.fixture(scope="module")
def toy():
    return load_base_model("toy")


def test_toy_is_a_builtin_shipped_as_a_small_safetensors_folder(toy):
    assert "toy" in builtin_models()
    folder = BUILTIN_FOLDERS["toy"]
    files = [path for path in folder.rglob("*") if path.is_file()]
    weights = [path for path in files if path.suffix == ".safetensors"]
    assert len(weights) == 3
    assert not [path for path in files if path.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    assert sum(path.stat().st_size for path in files) <= 20 * 1024 * 1024
    assert toy.architecture == "loraloom:toy"
    assert toy.resolution == 64
    assert toy.pipeline.vae_scale_factor == 4


@pytest.mark.slow
def test_fast_quality_subset_reaches_its_floor(toy):
    result, images = score(pipeline_generator(toy.pipeline, steps=FAST_STEPS), FAST_COUNT)
    assert len(images) == FAST_COUNT and images[0].size == (64, 64)
    hits = round((result.color + result.shape) * FAST_COUNT)
    assert hits >= HITS_FLOOR, result
