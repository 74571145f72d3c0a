"""Datasets: both folder conventions, caption handling, buckets, and errors that name the file."""

from __future__ import annotations

import json
import random

import pytest
import torch
from imagegen import make_folder

from trainer.data import (
    CaptionOptions,
    DatasetError,
    make_buckets,
    nearest_bucket,
    process_caption,
    scan_dataset,
)


def test_kohya_folder_is_read_with_captions(tmp_path):
    root = make_folder(tmp_path / "d", 6)
    dataset = scan_dataset(root, resolution=32)
    assert len(dataset) == 6 and dataset.source == "kohya"
    assert dataset.examples[0].caption == "red circle, shape, flat"
    assert all(e.bucket == (32, 32) for e in dataset.examples)
    batch = dataset.load([0, 1], random.Random(0))
    assert batch.pixels.shape == (2, 3, 32, 32)
    assert float(batch.pixels.min()) >= -1.0 and float(batch.pixels.max()) <= 1.0
    assert dataset.tag_frequency()["shape"] == 6


def test_metadata_jsonl_folder(tmp_path):
    root = make_folder(tmp_path / "d", 4, convention="jsonl")
    dataset = scan_dataset(root, resolution=16)
    assert dataset.source == "metadata.jsonl"
    assert [e.caption for e in dataset.examples][:2] == [
        "red circle, shape, flat",
        "blue square, shape, flat",
    ]


def test_resize_and_center_crop_keep_the_middle(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    from PIL import Image

    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 255, 255), (20, 0, 40, 20))  # white middle third
    image.save(root / "wide.png")
    (root / "wide.txt").write_text("x")
    pixels = scan_dataset(root, resolution=16).load([0], random.Random(0)).pixels[0]
    assert pixels.shape == (3, 16, 16)
    assert torch.all(pixels[:, :, 6:10] > 0.9)  # the crop is the white centre


def test_caption_trigger_shuffle_keep_and_dropout():
    caption = "a, b, c, d, e"
    options = CaptionOptions(trigger_word="sks", shuffle_tags=True, keep_tokens=1)
    seen = {process_caption(caption, options, random.Random(seed)) for seed in range(20)}
    assert all(text.startswith("sks, a, ") for text in seen)
    assert len(seen) > 1  # shuffled
    assert all(sorted(text.split(", ")) == ["a", "b", "c", "d", "e", "sks"] for text in seen)
    assert process_caption(caption, CaptionOptions(dropout=1.0), random.Random(0)) == ""
    assert process_caption(caption, CaptionOptions(), random.Random(0)) == caption


def test_aspect_ratio_buckets(tmp_path):
    buckets = make_buckets(64, 16, 32, 128)
    assert (64, 64) in buckets and all(w * h <= 64 * 64 for w, h in buckets)
    assert nearest_bucket((200, 100), buckets)[0] > nearest_bucket((200, 100), buckets)[1]
    root = make_folder(tmp_path / "d", 6, sizes=[(80, 40), (40, 80), (50, 50)])
    dataset = scan_dataset(root, resolution=64, buckets=True, size_multiple=4)
    shapes = {e.bucket for e in dataset.examples}
    assert len(shapes) == 3
    for batch in dataset.epoch_batches(0, 2, seed=0):
        assert len({dataset.examples[i].bucket for i in batch}) == 1
        pixels = dataset.load(batch, random.Random(0)).pixels
        w, h = dataset.examples[batch[0]].bucket
        assert pixels.shape[-2:] == (h, w)


def test_data_order_is_a_function_of_seed_and_epoch(tmp_path):
    dataset = scan_dataset(make_folder(tmp_path / "d", 8), resolution=16)
    epoch0 = dataset.epoch_batches(0, 3, seed=1)
    assert sorted(i for b in epoch0 for i in b) == list(range(8))
    assert epoch0 == dataset.epoch_batches(0, 3, seed=1)
    assert epoch0 != dataset.epoch_batches(1, 3, seed=1)
    assert dataset.batch_at(len(epoch0) + 1, 3, seed=1) == dataset.epoch_batches(1, 3, seed=1)[1]


def test_empty_folder_names_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"no training images in .*empty"):
        scan_dataset(empty, resolution=32)


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope", resolution=32)


def test_unreadable_image_names_the_file(tmp_path):
    root = make_folder(tmp_path / "d", 3)
    (root / "img001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DatasetError, match=r"cannot read image .*img001\.png"):
        scan_dataset(root, resolution=32)


def test_truncated_image_names_the_file(tmp_path):
    root = make_folder(tmp_path / "d", 3)
    data = (root / "img002.png").read_bytes()
    (root / "img002.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"img002\.png"):
        scan_dataset(root, resolution=32)


def test_missing_caption_names_the_image(tmp_path):
    root = make_folder(tmp_path / "d", 3)
    (root / "img002.txt").unlink()
    with pytest.raises(DatasetError, match=r"image .*img002\.png has no caption: expected img002\.txt"):
        scan_dataset(root, resolution=32)


def test_metadata_errors_name_the_line_and_file(tmp_path):
    root = make_folder(tmp_path / "d", 2, convention="jsonl")
    lines = (root / "metadata.jsonl").read_text().splitlines()
    (root / "metadata.jsonl").write_text(lines[0] + "\n" + json.dumps({"file_name": "img001.png"}) + "\n")
    with pytest.raises(DatasetError, match=r"metadata\.jsonl, line 2: image .*img001\.png has no caption"):
        scan_dataset(root, resolution=32)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"line 1: image .*gone\.png listed but not found"):
        scan_dataset(root, resolution=32)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "../escape.png", "text": "x"}) + "\n")
    with pytest.raises(DatasetError, match="outside"):
        scan_dataset(root, resolution=32)
