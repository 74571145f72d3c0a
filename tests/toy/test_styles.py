"""Style sets, style metrics and the shipped style adapters of the toy model (fast subset).

The full check (48 images per setting, 20 steps) is ``python -m bench quality``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adapters.formats import load_adapter
from adapters.validation import validate_against_base
from bench.quality import generate_with_blend
from server.models.toy.evaluate import DEFAULT_STEPS, prompts
from server.models.toy.measures import STYLE_THRESHOLDS, dominant_color, hollowness, style_metric
from server.models.toy.styles import (
    SHIPPED,
    STYLE_SETTINGS,
    STYLES,
    build,
    shipped_adapter,
    style_images,
    style_settings,
    write_style_folder,
)
from trainer.data import read_pairs

# A few images keep this fast; the margins below were measured on these exact seeds. Fewer than
# DEFAULT_STEPS changes what a blend draws (at 10 steps the 50/50 blend out-stripes striped alone).
FAST_COUNT = 8
FAST_STEPS = DEFAULT_STEPS
SEPARATION_COUNT = 40


@pytest.fixture(scope="module")
def plain_images():
    # Seed 1: neither the style sets' seed nor the model's.
    return [image for image, _ in style_images("plain", SEPARATION_COUNT, seed=1)]


@pytest.mark.parametrize("style", STYLES)
def test_style_metric_separates_drawn_style_images_from_plain_ones(style, plain_images):
    styled = [image for image, _ in style_images(style, SEPARATION_COUNT, seed=1)]
    threshold = STYLE_THRESHOLDS[style]  # fixed in measures.py
    plain_right = sum(style_metric(style, [image]) < threshold for image in plain_images)
    styled_right = sum(style_metric(style, [image]) >= threshold for image in styled)
    assert (plain_right + styled_right) / (2 * SEPARATION_COUNT) >= 0.95, (plain_right, styled_right)


def test_hollowness_is_blind_to_horizontal_stripes(plain_images):
    # A blend of striped and outlined is judged on both metrics: stripes must not read as an outline.
    striped = [image for image, _ in style_images("striped", SEPARATION_COUNT, seed=1)]
    plain = [hollowness(image) for image in plain_images]
    stripes = [hollowness(image) for image in striped]
    assert np.mean(stripes) <= np.mean(plain) + 0.005, (np.mean(stripes), np.mean(plain))
    threshold = STYLE_THRESHOLDS["outlined"]
    assert sum(value >= threshold for value in stripes) <= 1, sorted(stripes)[-3:]


def test_a_stray_colored_pixel_does_not_make_a_solid_shape_hollow():
    image = np.full((64, 64, 3), 255, np.uint8)
    image[20:40, 20:40] = (255, 0, 0)
    assert hollowness(image) == 0.0
    image[25, 60] = image[33, 2] = (255, 0, 0)  # specks in rows the square spans
    assert hollowness(image) == 0.0


def test_the_vertical_closing_fills_short_gaps_only():
    from server.models.toy.measures import _close_vertically

    column = np.zeros((12, 1), bool)
    column[[0, 4, 10]] = True  # a 3-row gap (filled) and a 5-row gap (kept), at the edge too
    closed = _close_vertically(column, 5)[:, 0].tolist()
    assert closed == [True] * 5 + [False] * 5 + [True, False]
    with pytest.raises(ValueError, match="odd"):
        _close_vertically(column, 4)


def test_an_outline_with_breaks_still_reads_hollow():
    # Generated outlines are often open; a flood fill would see no inside at all.
    opened = 0
    for image, labels in style_images("outlined", 10, seed=1):
        pixels = np.array(image)
        x, y, r = round(labels.center[0]), round(labels.center[1]), round(labels.radius)
        pixels[max(0, y - r) : y + r, x - 2 : x + 3] = pixels[0, 0]  # a 5 px gap through top and bottom
        opened += hollowness(pixels) >= STYLE_THRESHOLDS["outlined"]
    assert opened >= 9


def test_a_style_set_is_a_trainer_data_folder_with_the_dataset_captions(tmp_path):
    folder = write_style_folder("striped", tmp_path / "striped", 5)
    pairs, source = read_pairs(folder)
    assert source == "kohya" and len(pairs) == 5
    expected = [labels.caption for _, labels in style_images("striped", 5)]
    assert [caption for _, caption in pairs] == expected


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(2)
    from server.models.loader import load_base_model

    return load_base_model("toy")


@pytest.mark.parametrize("style", SHIPPED)
def test_a_shipped_adapter_is_small_fp16_and_fits_the_toy_model(style, toy):
    path = shipped_adapter(style)
    assert path.is_file() and path.stat().st_size < 512 * 1024
    adapter = load_adapter(path.read_bytes(), module_names=toy.module_shapes.keys())
    validate_against_base(adapter, toy.module_shapes, toy.base_ref)
    assert {module.down.dtype for module in adapter.modules.values()} == {torch.float16}
    assert adapter.metadata.get("ss_output_name") == style


def test_flags_override_a_styles_own_settings_which_override_the_defaults():
    own = style_settings("outlined")
    assert own.steps == STYLE_SETTINGS["outlined"]["steps"] and own.min_snr_gamma == 5.0
    flagged = style_settings("outlined", {"steps": 7})
    assert flagged.steps == 7 and flagged.min_snr_gamma == 5.0
    assert "--min-snr-gamma=5" in flagged.flags() and "--steps=7" in flagged.flags()
    assert not any(flag.startswith("--min-snr") for flag in style_settings("striped").flags())


@pytest.mark.slow
def test_build_trains_a_style_adapter_with_the_real_cli(tmp_path, toy):
    tiny = {"images": 4, "steps": 2, "batch_size": 2, "threads": 1}
    times = build(tmp_path, ("outlined",), ship=False, overrides=tiny)
    adapter = load_adapter((tmp_path / "outlined.safetensors").read_bytes(), module_names=toy.module_shapes)
    validate_against_base(adapter, toy.module_shapes, toy.base_ref)
    record = json.loads((tmp_path / "build.json").read_text())
    assert record["settings"]["outlined"]["steps"] == 2
    assert record["settings"]["outlined"]["min_snr_gamma"] == 5.0
    assert times["outlined"].wall > 0 and len(list((tmp_path / "data" / "outlined").glob("*.png"))) == 4


# Measured on these seeds (8 images, 20 steps): striped 0.06 -> 0.21, outlined hollowness 0.03 -> 0.21;
# their 50/50 blend: stripes 0.127 (parents 0.078 / 0.206), hollowness 0.102 (parents 0.062 / 0.213).
MARGINS = {"striped": 0.1, "outlined": 0.1}


@pytest.fixture(scope="module")
def measured(toy):
    """Style metrics and color hits of FAST_COUNT images under a blend of the shipped adapters."""
    from server.engine import Engine
    from server.engine.resolvers import MemoryResolver

    resolver = MemoryResolver()
    for style in SHIPPED:
        resolver.add_file(style, shipped_adapter(style))
    engine = Engine(toy, resolver=resolver)
    asked = prompts(FAST_COUNT, seed=1)
    texts, seeds = [p.text for p in asked], list(range(1000, 1000 + FAST_COUNT))
    done: dict[tuple, tuple[dict[str, float], int]] = {}

    def run(blend: tuple[tuple[str, float], ...]) -> tuple[dict[str, float], int]:
        if blend not in done:
            images = generate_with_blend(engine, texts, seeds, blend, steps=FAST_STEPS)
            hits = sum(dominant_color(image) == p.color for image, p in zip(images, asked, strict=True))
            done[blend] = ({style: style_metric(style, images) for style in SHIPPED}, hits)
        return done[blend]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("style", sorted(MARGINS))
def test_a_shipped_adapter_moves_its_metric_and_keeps_the_colors(style, measured):
    base, base_hits = measured(())
    tuned, hits = measured(((style, 1.0),))
    assert tuned[style] - base[style] > MARGINS[style], (style, base[style], tuned[style])
    assert hits >= min(base_hits, FAST_COUNT - 1), (hits, base_hits)


@pytest.mark.slow
def test_a_50_50_blend_lands_between_its_parents_on_both_metrics(measured):
    a, b = SHIPPED
    mixed, _ = measured(((a, 0.5), (b, 0.5)))
    alone = {style: measured(((style, 1.0),))[0] for style in SHIPPED}
    for style in SHIPPED:
        low, high = sorted((alone[a][style], alone[b][style]))
        assert low < mixed[style] < high, (style, low, mixed[style], high)
