"""The training set: images and captions from a folder, batched by aspect-ratio bucket.

Two folder conventions are read: kohya's (``img.png`` next to ``img.txt``) and
diffusers' (``metadata.jsonl`` with ``file_name`` and ``text`` per line). Every
image is opened once while scanning, so a broken file is reported before
training starts, by name.

Everything random here (data order, caption shuffling and dropout, flips) is a
pure function of the seed and the position in training, so a resumed run sees
exactly the batches an uninterrupted run would.

Each example also knows its geometry as SDXL conditions on it (kohya's sd-scripts
and diffusers' SDXL scripts alike): the image's original size, the top-left corner
of the crop taken from the resized image, and the bucket it is trained at.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from adapters.errors import InvalidArgument

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
CAPTION_COLUMNS = ("text", "caption")
# Decoded, resized images are kept in memory up to this many bytes (float32 pixels).
IMAGE_CACHE_BYTES = 1 << 30


class DatasetError(InvalidArgument):
    """The training folder cannot be used as it is; the message names the file."""


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str
    size: tuple[int, int]  # original (width, height)
    bucket: tuple[int, int]  # training (width, height)

    def crop_top_left(self, flip: bool = False) -> tuple[int, int]:
        """Where the bucket-sized crop starts in the resized image, (top, left); mirrored with the
        image when ``flip`` (the crop of the flipped image, as kohya's sd-scripts record it)."""
        (width, _), (left, top) = cover_geometry(self.size, self.bucket)
        if flip:
            left = width - left - self.bucket[0]
        return top, left

    def size_conditioning(self, flip: bool = False) -> tuple[int, ...]:
        """SDXL's ``time_ids`` for this example: original (height, width), crop (top, left),
        target (height, width)."""
        top, left = self.crop_top_left(flip)
        return (self.size[1], self.size[0], top, left, self.bucket[1], self.bucket[0])


@dataclass(frozen=True)
class Item:
    """One example as drawn for one micro-batch: mirrored or not, and its caption as edited."""

    index: int
    flip: bool
    caption: str


@dataclass(frozen=True)
class Batch:
    pixels: torch.Tensor  # (batch, 3, height, width) in [-1, 1]
    captions: list[str]
    indices: list[int]
    flips: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class CaptionOptions:
    trigger_word: str = ""
    dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def process_caption(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """Shuffle tags (keeping the first ``keep_tokens``), prepend the trigger word, maybe drop it all."""
    tags = split_tags(caption)
    if options.shuffle_tags and len(tags) > options.keep_tokens + 1:
        head, tail = tags[: options.keep_tokens], tags[options.keep_tokens :]
        rng.shuffle(tail)
        tags = head + tail
    if options.trigger_word:
        tags = [options.trigger_word, *tags]
    text = ", ".join(tags)
    if options.dropout and rng.random() < options.dropout:
        return ""
    return text


def make_buckets(resolution: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """kohya-style buckets: sides multiples of ``step`` within bounds, area at most resolution²."""
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = min_side
    while width <= max_side:
        height = min(max_side, (area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def cover_geometry(size: tuple[int, int], target: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """How an image of ``size`` (width, height) becomes ``target``: the size it is resized to so it
    covers the target, and the (left, top) of the centered crop taken from that."""
    width, height = target
    scale = max(width / size[0], height / size[1])
    resized = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
    return resized, ((resized[0] - width) // 2, (resized[1] - height) // 2)


def resize_and_crop(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Scale so the image covers ``target`` (width, height), then center-crop to it."""
    width, height = target
    resized, (left, top) = cover_geometry(image.size, target)
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BICUBIC)
    return image.crop((left, top, left + width, top + height))


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DatasetError(
            f"cannot read image {path}: {error}; fix or remove the file and run again"
        ) from None


class Dataset:
    """A scanned folder: examples, their buckets, and deterministic batching."""

    def __init__(self, root: Path, examples: list[Example], source: str, caption_options: CaptionOptions):
        self.root = root
        self.examples = examples
        self.source = source  # "kohya" or "metadata.jsonl"
        self.caption_options = caption_options
        self._pixels: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0
        self._digests: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.examples)

    # ------------------------------------------------------------------ order

    def batches_per_epoch(self, batch_size: int) -> int:
        counts = Counter(example.bucket for example in self.examples)
        return sum(math.ceil(count / batch_size) for count in counts.values())

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
        """The batches of one epoch: each from one bucket, shuffled by (seed, epoch)."""
        return _epoch_batches(tuple(e.bucket for e in self.examples), epoch, batch_size, seed)

    def batch_at(self, micro_step: int, batch_size: int, seed: int) -> list[int]:
        per_epoch = self.batches_per_epoch(batch_size)
        epoch, position = divmod(micro_step, per_epoch)
        return self.epoch_batches(epoch, batch_size, seed)[position]

    # ------------------------------------------------------------------ loading

    def draw(self, indices: list[int], rng: random.Random, *, random_flip: bool = False) -> list[Item]:
        """What a micro-batch trains on, decoding nothing: each example's flip and edited caption."""
        items = []
        for index in indices:
            flip = bool(random_flip and rng.random() < 0.5)
            caption = process_caption(self.examples[index].caption, self.caption_options, rng)
            items.append(Item(index, flip, caption))
        return items

    def load(self, indices: list[int], rng: random.Random, *, random_flip: bool = False) -> Batch:
        items = self.draw(indices, rng, random_flip=random_flip)
        pixels = [self.pixels(item.index, flip=item.flip) for item in items]
        return Batch(
            pixels=torch.stack(pixels),
            captions=[item.caption for item in items],
            indices=list(indices),
            flips=[item.flip for item in items],
        )

    def digest(self, index: int) -> str:
        """sha256 of example ``index``'s image file (the bytes, not the name: a cache key)."""
        digest = self._digests.get(index)
        if digest is None:
            digest = hashlib.sha256(self.examples[index].image.read_bytes()).hexdigest()
            self._digests[index] = digest
        return digest

    def pixels(self, index: int, *, flip: bool = False, keep: bool = True) -> torch.Tensor:
        """Example ``index`` resized and cropped to its bucket, (3, h, w) in [-1, 1], mirrored left-right
        when ``flip``; kept in memory while small (unless not ``keep``: decoded once, as for caching)."""
        tensor = self._pixels_of(index, keep)
        return tensor.flip(-1) if flip else tensor

    def _pixels_of(self, index: int, keep: bool) -> torch.Tensor:
        cached = self._pixels.get(index)
        if cached is not None:
            return cached
        example = self.examples[index]
        image = resize_and_crop(_open_rgb(example.image), example.bucket)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        size = tensor.numel() * tensor.element_size()
        if keep and self._cached_bytes + size <= IMAGE_CACHE_BYTES:
            self._pixels[index] = tensor
            self._cached_bytes += size
        return tensor

    # ------------------------------------------------------------------ summaries (for ss_* metadata)

    def tag_frequency(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for example in self.examples:
            counts.update(split_tags(example.caption))
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def bucket_counts(self) -> dict[str, int]:
        counts = Counter(f"{w}x{h}" for w, h in (e.bucket for e in self.examples))
        return dict(sorted(counts.items()))

    def bucket_info(self) -> dict:
        """kohya's ``ss_bucket_info``: each bucket's resolution and image count, and the mean
        difference between an image's aspect ratio and its bucket's."""
        counts = Counter(e.bucket for e in self.examples)
        buckets = {
            str(i): {"resolution": list(bucket), "count": count}
            for i, (bucket, count) in enumerate(sorted(counts.items()))
        }
        errors = [abs(e.bucket[0] / e.bucket[1] - e.size[0] / e.size[1]) for e in self.examples]
        return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


@lru_cache(maxsize=4)
def _epoch_batches(buckets: tuple[tuple[int, int], ...], epoch: int, batch_size: int, seed: int):
    rng = random.Random(f"loraloom-epoch:{seed}:{epoch}")
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(buckets):
        by_bucket.setdefault(bucket, []).append(index)
    batches: list[list[int]] = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        rng.shuffle(members)
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------- scanning


def scan_dataset(
    root: str | Path,
    *,
    resolution: int,
    caption_extension: str = ".txt",
    caption_options: CaptionOptions | None = None,
    buckets: bool = False,
    bucket_step: int = 64,
    min_bucket: int = 256,
    max_bucket: int = 1024,
    size_multiple: int = 8,
) -> Dataset:
    """Read the folder's images and captions; raise ``DatasetError`` naming any bad file."""
    root = Path(root).expanduser()
    pairs, source = read_pairs(root, caption_extension)
    if resolution % size_multiple:
        raise DatasetError(f"resolution {resolution} must be a multiple of {size_multiple} for this model")
    if buckets:
        step = max(size_multiple, min(bucket_step, resolution // 4) // size_multiple * size_multiple)
        low = max(step, min(min_bucket, resolution // 2) // step * step)
        high = max(resolution, max_bucket // step * step)
        choices = make_buckets(resolution, step, low, high)
    else:
        choices = [(resolution, resolution)]
    examples = []
    for image_path, caption in pairs:
        size = _open_rgb(image_path).size
        examples.append(Example(image_path, caption, size, nearest_bucket(size, choices)))
    return Dataset(root, examples, source, caption_options or CaptionOptions())


def read_pairs(root: str | Path, caption_extension: str = ".txt") -> tuple[list[tuple[Path, str]], str]:
    """(image, caption) pairs and the convention used; cheap (no image is decoded).

    Raises ``DatasetError`` for a missing or empty folder, a missing caption, a bad metadata line.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"training data folder {root} does not exist or is not a folder")
    metadata = root / METADATA_FILE
    if metadata.is_file():
        pairs, source = _read_metadata(root, metadata), METADATA_FILE
    else:
        pairs, source = _read_kohya(root, caption_extension), "kohya"
    if not pairs:
        raise DatasetError(
            f"no training images in {root}: put {', '.join(IMAGE_SUFFIXES)} files there, "
            f"each with a same-named {caption_extension} caption (kohya), "
            f"or list them in a {METADATA_FILE} (diffusers)"
        )
    return pairs, source


def _read_kohya(root: Path, caption_extension: str) -> list[tuple[Path, str]]:
    pairs = []
    for path in sorted(root.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        caption_path = path.with_suffix(caption_extension)
        if not caption_path.is_file():
            raise DatasetError(
                f"image {path} has no caption: expected {caption_path.name} next to it "
                f"(an empty file means no caption), or describe the folder in a {METADATA_FILE}"
            )
        try:
            caption = caption_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError(f"cannot read caption {caption_path}: {error}") from None
        pairs.append((path, " ".join(caption.split())))
    return pairs


def _read_metadata(root: Path, metadata: Path) -> list[tuple[Path, str]]:
    pairs = []
    try:
        lines = metadata.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read {metadata}: {error}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{metadata}, line {number}"
        try:
            record = json.loads(line)
        except ValueError as error:
            raise DatasetError(f"{where} is not valid JSON: {error}") from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise DatasetError(
                f'{where} has no "file_name": each line needs {{"file_name": ..., "text": ...}}'
            )
        image = (root / record["file_name"]).resolve()
        if root.resolve() not in image.parents:
            raise DatasetError(f"{where}: file_name {record['file_name']!r} points outside {root}")
        if not image.is_file():
            raise DatasetError(f"{where}: image {image} listed but not found")
        caption = next((record[c] for c in CAPTION_COLUMNS if isinstance(record.get(c), str)), None)
        if caption is None:
            raise DatasetError(f'{where}: image {image} has no caption ("text" field)')
        pairs.append((image, " ".join(caption.split())))
    return pairs
