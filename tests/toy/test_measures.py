"""The measures on drawn images (ground truth): they must be (near) perfect there."""

from __future__ import annotations

import numpy as np
from PIL import Image

from server.models.toy.dataset import COLOR_HUES, COLORS, SHAPES, ShapesDataset
from server.models.toy.measures import CLASSIFIER_FILE, accuracy, classify_shapes, dominant_color, hue_degrees


def test_pure_colors_have_their_hue():
    for name, rgb in COLORS.items():
        hue = float(hue_degrees(np.array(rgb, dtype=np.float32) / 255.0))
        assert abs((hue - COLOR_HUES[name] + 180) % 360 - 180) < 12, name


def test_a_neutral_image_has_no_color():
    assert dominant_color(Image.new("RGB", (64, 64), (128, 128, 128))) is None


def test_measures_are_near_perfect_on_held_out_drawn_images():
    # Seed 1 is neither the classifier's training seed nor the toy model's.
    images, labels = ShapesDataset(seed=1).arrays(0, 300)
    result = accuracy(list(images), [lab.color for lab in labels], [lab.shape for lab in labels])
    assert result.count == 300
    assert result.color == 1.0
    assert result.shape >= 0.97


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
