"""The synthetic shapes dataset: a pure function of (seed, index), captions that say what is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from server.models.toy.dataset import (
    BACKGROUNDS,
    COLORS,
    RESOLUTION,
    SHAPES,
    SIZES,
    ShapesDataset,
    all_captions,
    caption_for,
)


def test_same_seed_and_index_give_identical_samples():
    first, second = ShapesDataset(seed=3), ShapesDataset(seed=3)
    for index in (0, 1, 57, 9999):
        a, b = first[index], second[index]
        assert a.caption == b.caption
        assert a.labels == b.labels
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_other_seeds_and_indices_differ():
    images, _ = ShapesDataset(seed=0).arrays(0, 20)
    others, _ = ShapesDataset(seed=1).arrays(0, 20)
    assert not np.array_equal(images, others)
    assert len({images[i].tobytes() for i in range(20)}) == 20


def test_images_are_64px_rgb_and_labels_in_range():
    dataset = ShapesDataset(seed=0)
    for index in range(50):
        sample = dataset[index]
        assert sample.image.size == (RESOLUTION, RESOLUTION) and sample.image.mode == "RGB"
        labels = sample.labels
        assert labels.color in COLORS and labels.shape in SHAPES
        assert labels.size in SIZES and labels.background in BACKGROUNDS
        low, high = SIZES[labels.size]
        assert low <= labels.radius <= high
        for coordinate in labels.center:
            assert labels.radius <= coordinate <= RESOLUTION - labels.radius


def test_caption_names_what_is_drawn():
    sample = ShapesDataset(seed=0)[0]
    labels = sample.labels
    words = sample.caption.split()
    assert words[:4] == ["a", labels.size, labels.color, labels.shape]
    assert words[-2:] == [labels.background, "background"]
    assert ("textured" in words) == labels.textured
    assert caption_for("red", "circle", size="small") == "a small red circle on a white background"
    assert caption_for("blue", "star", background="black", textured=True) == (
        "a large blue star on a textured black background"
    )


def test_shape_pixels_have_the_named_color_and_backgrounds_are_neutral():
    dataset = ShapesDataset(seed=0)
    for index in range(30):
        sample = dataset[index]
        rgb = np.asarray(sample.image).astype(int)
        cx, cy = (round(v) for v in sample.labels.center)
        assert tuple(rgb[cy, cx]) == COLORS[sample.labels.color]
        corner = rgb[0, 0]
        assert corner.max() - corner.min() <= 2


def test_every_combination_has_a_caption_and_every_caption_occurs():
    captions = all_captions()
    assert (
        len(captions) == len(set(captions)) == 2 * len(COLORS) * len(SHAPES) * len(SIZES) * len(BACKGROUNDS)
    )
    seen = {ShapesDataset(seed=0)[i].caption for i in range(3000)}
    assert seen <= set(captions)
    assert len(seen) > 0.9 * len(captions)


def test_index_out_of_range_is_refused():
    with pytest.raises(IndexError):
        ShapesDataset(seed=0, length=10)[10]
