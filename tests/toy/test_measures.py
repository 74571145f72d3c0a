"""The measures on drawn images (ground truth): they must be (near) perfect there."""

from __future__ import annotations

import numpy as np
from PIL import Image

from server.models.toy.dataset import BACKGROUNDS, COLOR_HUES, COLORS, SHAPES, ShapesDataset
from server.models.toy.measures import (
    CLASSIFIER_FILE,
    accuracy,
    background_of,
    classify_shapes,
    dominant_color,
    hue_degrees,
)


def test_pure_colors_have_their_hue():
    for name, rgb in COLORS.items():
        hue = float(hue_degrees(np.array(rgb, dtype=np.float32) / 255.0))
        assert abs((hue - COLOR_HUES[name] + 180) % 360 - 180) < 12, name


def test_a_neutral_image_has_no_color():
    assert dominant_color(Image.new("RGB", (64, 64), (128, 128, 128))) is None


def test_measures_are_near_perfect_on_held_out_drawn_images():
    # Seed 1 is neither the classifier's training seed nor the toy model's.
    images, labels = ShapesDataset(seed=1).arrays(0, 300)
    result = accuracy(
        list(images),
        [lab.color for lab in labels],
        [lab.shape for lab in labels],
        [lab.background for lab in labels],
    )
    assert result.count == 300
    assert result.color == 1.0
    assert result.shape >= 0.97
    assert result.background == 1.0  # plain and textured, every tone
    without = accuracy(list(images), [lab.color for lab in labels], [lab.shape for lab in labels])
    assert without.background is None


def _framed(border: tuple[int, int, int], inside: tuple[int, int, int] = (230, 25, 25)) -> Image.Image:
    image = Image.new("RGB", (64, 64), border)
    image.paste(Image.new("RGB", (40, 40), inside), (12, 12))
    return image


def test_background_classes_follow_hsl_lightness_and_saturation():
    assert set(BACKGROUNDS) == {"white", "gray", "black"}  # the classes background_of knows
    cases = {
        (245, 245, 245): "white",  # L 0.96, S 0
        (236, 236, 226): "white",  # a faint cream: S 0.21
        (240, 238, 200): None,  # pale yellow: L 0.86 but S 0.57
        (190, 190, 190): None,  # light gray: L 0.75, between gray and white
        (128, 128, 128): "gray",
        (140, 120, 130): "gray",  # S 0.08
        (170, 100, 115): None,  # mauve: L 0.53, S 0.29
        (20, 20, 20): "black",
        (60, 10, 40): "black",  # L 0.14: dark reads black whatever its tint
        (70, 70, 70): None,  # L 0.27: too light for black, too dark for gray
    }
    for border, expected in cases.items():
        assert background_of(_framed(border)) == expected, border
    # The shape reaching into the ring does not move the median.
    image = _framed((20, 20, 20))
    image.paste(Image.new("RGB", (64, 2), (255, 255, 0)), (0, 0))
    assert background_of(image) == "black"


def test_the_classifier_weights_ship_and_every_shape_is_recognised():
    assert CLASSIFIER_FILE.is_file() and CLASSIFIER_FILE.stat().st_size < 64_000
    dataset = ShapesDataset(seed=2)
    by_shape: dict[str, list] = {shape: [] for shape in SHAPES}
    index = 0
    while min(len(v) for v in by_shape.values()) < 10:
        sample = dataset[index]
        by_shape[sample.labels.shape].append(sample.image)
        index += 1
    for shape, images in by_shape.items():
        guesses = classify_shapes(images[:10])
        assert guesses.count(shape) >= 9, (shape, guesses)


def test_a_wrong_label_is_counted_as_a_miss():
    images, labels = ShapesDataset(seed=1).arrays(0, 20)
    wrong_colors = [next(c for c in COLORS if c != lab.color) for lab in labels]
    result = accuracy(list(images), wrong_colors, [lab.shape for lab in labels])
    assert result.color == 0.0
