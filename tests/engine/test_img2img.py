"""img2img and inpainting in the engine: diffusers' pipelines' images, the strength rule, the mask."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.errors import InvalidArgument
from server.engine import GenerateRequest
from tests.engine.conftest import make_adapters, make_engine


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def square_mask() -> Image.Image:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask)


@pytest.fixture()
def tiny_engine(tiny_pipeline):
    return make_engine(tiny_pipeline, "tiny", make_adapters(tiny_pipeline, 2))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(int)


def test_img2img_draws_what_diffusers_img2img_draws(tiny_pipeline, tiny_engine, picture):
    from diffusers import StableDiffusionImg2ImgPipeline

    request = GenerateRequest(
        "a red circle", steps=10, seed=3, init_image=png(picture), strength=0.6, adapters=[("ink", 0.8)]
    )
    result = tiny_engine.generate(request)
    assert result.parameters.strength == 0.6 and len(result.parameters.init_image.sha256) == 64
    reference = StableDiffusionImg2ImgPipeline(**copy.deepcopy(tiny_engine.pipeline).components)
    image = reference(
        "a red circle",
        image=picture,
        strength=0.6,
        num_inference_steps=10,
        generator=[torch.Generator().manual_seed(3)],
    ).images[0]
    assert np.array_equal(pixels(result), np.asarray(image).astype(int))


def test_inpainting_draws_what_diffusers_inpainting_draws(tiny_engine, picture, square_mask):
    from diffusers import StableDiffusionInpaintPipeline

    for strength in (0.8, 1.0):
        request = GenerateRequest(
            "a red circle",
            steps=10,
            seed=3,
            init_image=png(picture),
            mask_image=png(square_mask),
            strength=strength,
        )
        result = tiny_engine.generate(request)
        reference = StableDiffusionInpaintPipeline(**copy.deepcopy(tiny_engine.pipeline).components)
        image = reference(
            "a red circle",
            image=picture,
            mask_image=square_mask,
            strength=strength,
            num_inference_steps=10,
            generator=[torch.Generator().manual_seed(3)],
        ).images[0]
        image = reference.image_processor.apply_overlay(square_mask, picture, image)  # A1111's overlay
        assert np.abs(pixels(result) - np.asarray(image).astype(int)).max() <= 1
        outside = np.asarray(square_mask) == 0
        assert np.array_equal(pixels(result)[outside], np.asarray(picture).astype(int)[outside])


def test_sdxl_img2img_and_inpainting_draw_what_diffusers_draws(tiny_sdxl_pipeline, picture, square_mask):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    engine = make_engine(tiny_sdxl_pipeline, "tiny-sdxl", {})
    common = {"negative_prompt": "fog", "num_inference_steps": 6, "guidance_scale": 7.5}
    init = png(picture)
    for pipeline_class, extra in (
        (StableDiffusionXLImg2ImgPipeline, {}),
        (StableDiffusionXLInpaintPipeline, {"mask_image": square_mask}),
    ):
        asked = {"mask_image": png(square_mask)} if extra else {}
        request = GenerateRequest(
            "a red circle", negative_prompt="fog", steps=6, seed=3, init_image=init, strength=0.7, **asked
        )
        result = engine.generate(request)
        reference = pipeline_class(**copy.deepcopy(tiny_sdxl_pipeline).components)
        image = reference(
            "a red circle",
            image=picture,
            strength=0.7,
            generator=[torch.Generator().manual_seed(3)],
            **common,
            **extra,
        ).images[0]
        if extra:
            image = reference.image_processor.apply_overlay(square_mask, picture, image)
        assert np.abs(pixels(result) - np.asarray(image).astype(int)).max() <= 1, pipeline_class.__name__


def test_strength_one_is_txt2img_and_batches_keep_each_image_its_own(tiny_engine, picture):
    txt2img = tiny_engine.generate(GenerateRequest("a tree", steps=4, seed=7))
    full = tiny_engine.generate(
        GenerateRequest("a tree", steps=4, seed=7, init_image=png(picture), strength=1.0)
    )
    assert np.array_equal(pixels(txt2img), pixels(full))
    pair = tiny_engine.generate(
        GenerateRequest("a tree", steps=4, seed=7, num_images=2, init_image=png(picture), strength=0.5)
    )
    alone = tiny_engine.generate(
        GenerateRequest("a tree", steps=4, seed=8, init_image=png(picture), strength=0.5)
    )
    assert np.abs(np.asarray(pair.images[1]).astype(int) - pixels(alone)).max() <= 1


def test_pictures_are_fitted_by_crop_and_resize(tiny_engine):
    wide = Image.new("RGB", (128, 64), (0, 0, 255))
    wide.paste((255, 0, 0), (32, 0, 96, 64))  # red center, blue sides cropped away
    request = GenerateRequest("a tree", steps=2, seed=1, init_image=png(wide), strength=0.5)
    settings = tiny_engine.normalize(request).settings
    fitted = np.asarray(settings.init_image.image)
    assert fitted.shape == (64, 64, 3) and (fitted[:, :, 0] > 200).all() and (fitted[:, :, 2] < 50).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"init_image": b"not a picture"}, "not a PNG or JPEG"),
        ({"strength": 0.5}, "needs an init_image"),
        ({"mask_image": b"x"}, "needs an init_image"),
        ({"init_image": "PICTURE", "strength": 0.0}, "out of range"),
        ({"init_image": "PICTURE", "strength": 0.05}, "runs no step"),
        ({"init_image": "PICTURE", "mask_image": "SMALL_MASK"}, "must have the init image's size"),
        ({"schedule": "karras", "sampler": "ddim"}, "needs a sampler that takes it"),
        ({"schedule": "sideways"}, "unknown schedule"),
        ({"eta": 0.5, "sampler": "euler"}, "has no eta"),
        ({"clip_skip": 7}, "deeper than this base model"),
        ({"clip_skip": 40}, "out of range"),
    ],
)
def test_bad_picture_requests_are_refused(tiny_engine, picture, change, message):
    values = {
        key: png(picture)
        if value == "PICTURE"
        else png(Image.new("L", (8, 8)))
        if value == "SMALL_MASK"
        else value
        for key, value in change.items()
    }
    with pytest.raises(InvalidArgument, match=message):
        tiny_engine.normalize(GenerateRequest("a tree", steps=10, **values))


def test_a_decompression_bomb_is_refused_before_decoding(tiny_engine):
    huge = Image.new("L", (5000, 5000))
    with pytest.raises(InvalidArgument, match="at most"):
        tiny_engine.normalize(GenerateRequest("a tree", init_image=png(huge)))


def test_schedules_and_eta_run(tiny_engine):
    base = tiny_engine.generate(GenerateRequest("a tree", steps=4, seed=7, sampler="euler"))
    karras = tiny_engine.generate(
        GenerateRequest("a tree", steps=4, seed=7, sampler="euler", schedule="karras")
    )
    assert karras.parameters.schedule == "karras" and not np.array_equal(pixels(base), pixels(karras))
    ddim = tiny_engine.generate(GenerateRequest("a tree", steps=4, seed=7, sampler="ddim", eta=1.0))
    plain = tiny_engine.generate(GenerateRequest("a tree", steps=4, seed=7, sampler="ddim"))
    assert ddim.parameters.eta == 1.0 and not np.array_equal(pixels(ddim), pixels(plain))
