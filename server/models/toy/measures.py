"""What a toy-model image shows: the shape's color, the shape itself and the background.

Backgrounds in the toy data are neutral (white, gray, black), shapes are fully
saturated, so the shape's pixels are the ones with high chroma (max - min of
R, G, B). Images are first white-balanced on their border (:func:`neutralize`),
so a generated image with a tinted background is still judged on its shape.

- Color: the hue histogram of the high-chroma pixels, voted into the six named
  hues (each owns +-30 degrees); no saturated pixels means no color (a miss).
- Shape: a tiny CNN over the chroma map (so it is blind to color and
  background), fitted on the synthetic data with a fixed seed. Its weights ship
  next to this file (``shape_classifier.safetensors``, ~30 KB, fp16);
  ``python -m server.models.toy.measures --refit`` rebuilds them the same way.
- Background: the median color of the border ring (:data:`BORDER` pixels, not
  white-balanced) classified by its HSL lightness L and saturation S: white
  L > 0.80 and S < 0.25, gray 0.30 < L < 0.70 and S < 0.25, black L < 0.25,
  else none (:func:`background_of`). The median ignores the odd shape pixel
  that reaches into the ring and the texture's stripes and noise.
- Style (the style adapters of :mod:`server.models.toy.styles`), each a number
  per image on the same white-balanced chroma map, higher = more of the style:
  :func:`stripe_anisotropy` (vertical over horizontal chroma gradients),
  :func:`hollowness` (share of the shape's row spans that is not colored,
  blind to horizontal stripes) and :func:`lightness` (mean HSL lightness of
  the shape's pixels: pastel colors are lighter). :data:`STYLE_THRESHOLDS`
  split drawn style images from plain ones.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from server.models.toy.dataset import COLOR_HUES, SHAPES, ShapesDataset
from server.models.toy.styles import STRIPE_PERIOD

CLASSIFIER_FILE = Path(__file__).with_name("shape_classifier.safetensors")
CHROMA_THRESHOLD = 0.35
MIN_SHAPE_PIXELS = 6
# Seeds far from the ones the model is trained on, so the classifier never sees training images.
CLASSIFIER_SEED = 7919
CLASSIFIER_SAMPLES = 8000


BORDER = 3  # pixels of the border ring (white balance, background)
# HSL bounds of the background classes (lightness, saturation): the definition.
BACKGROUND_MAX_SATURATION = 0.25
WHITE_MIN_LIGHTNESS = 0.80
GRAY_LIGHTNESS = (0.30, 0.70)
BLACK_MAX_LIGHTNESS = 0.25


def _border_ring(rgb: np.ndarray) -> np.ndarray:
    """The (N, 3) pixels of the :data:`BORDER`-pixel ring around ``rgb`` (H, W, 3), each pixel once."""
    inner = np.ones(rgb.shape[:2], dtype=bool)
    inner[BORDER:-BORDER, BORDER:-BORDER] = False
    return rgb[inner]


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    return neutralize(array.astype(np.float32) / 255.0)


def neutralize(rgb: np.ndarray) -> np.ndarray:
    """White-balance on the background: shift colors so the border's median becomes neutral gray.

    Drawn images already have neutral backgrounds (a no-op there); a generated
    image whose whole background came out tinted is judged on its shape's
    color relative to that background, as a viewer would.
    """
    edges = (rgb[:BORDER], rgb[-BORDER:], rgb[:, :BORDER], rgb[:, -BORDER:])
    frame = np.concatenate([edge.reshape(-1, 3) for edge in edges])
    background = np.median(frame, axis=0)
    return np.clip(rgb - (background - background.mean()), 0.0, 1.0)


def chroma(image: Image.Image | np.ndarray) -> np.ndarray:
    """max(R,G,B) - min(R,G,B) per pixel, in [0, 1] (H x W)."""
    rgb = _as_array(image)
    return rgb.max(axis=-1) - rgb.min(axis=-1)


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of float RGB pixels (..., 3)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    delta = np.where(high - low > 1e-6, high - low, 1.0)
    hue = np.where(
        high == r, ((g - b) / delta) % 6.0, np.where(high == g, (b - r) / delta + 2.0, (r - g) / delta + 4.0)
    )
    return (hue * 60.0) % 360.0


def dominant_color(image: Image.Image | np.ndarray) -> str | None:
    """The named hue most of the shape's (high-chroma) pixels have, or None if none are saturated."""
    rgb = _as_array(image)
    mask = (rgb.max(axis=-1) - rgb.min(axis=-1)) > CHROMA_THRESHOLD
    if int(mask.sum()) < MIN_SHAPE_PIXELS:
        return None
    hues = hue_degrees(rgb[mask])
    names = list(COLOR_HUES)
    centers = np.array([COLOR_HUES[name] for name in names], dtype=np.float32)
    distance = np.abs((hues[:, None] - centers[None, :] + 180.0) % 360.0 - 180.0)
    votes = np.bincount(distance.argmin(axis=1), minlength=len(names))
    return names[int(votes.argmax())]


def hsl_lightness_saturation(rgb: np.ndarray) -> tuple[float, float]:
    """HSL lightness and saturation of one float RGB color in [0, 1]."""
    high, low = float(np.max(rgb)), float(np.min(rgb))
    lightness = (high + low) / 2.0
    spread = 1.0 - abs(2.0 * lightness - 1.0)
    saturation = (high - low) / spread if spread > 1e-6 else 0.0
    return lightness, saturation


def background_of(image: Image.Image | np.ndarray) -> str | None:
    """The background class (white, gray or black) of the border ring's median color, else None.

    White: L > 0.80 and S < 0.25; gray: 0.30 < L < 0.70 and S < 0.25; black: L < 0.25 (HSL). The
    image is not white-balanced first: the background's own tint is what is judged.
    """
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    rgb = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    lightness, saturation = hsl_lightness_saturation(np.median(_border_ring(rgb), axis=0))
    if lightness < BLACK_MAX_LIGHTNESS:
        return "black"
    if saturation >= BACKGROUND_MAX_SATURATION:
        return None
    if lightness > WHITE_MIN_LIGHTNESS:
        return "white"
    if GRAY_LIGHTNESS[0] < lightness < GRAY_LIGHTNESS[1]:
        return "gray"
    return None


class ShapeClassifier(nn.Module):
    """Chroma map (N, 1, 64, 64) -> logits over :data:`SHAPES`; global max pooling makes it position-blind."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(1),
        )
        self.head = nn.Linear(32, len(SHAPES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _chroma_batch(images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack([chroma(image) for image in images])[:, None])


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur some images and add noise: generated images are softer and noisier than drawn ones."""
    blurred = nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    pick = (torch.rand(x.shape[0], 1, 1, 1, generator=generator) < 0.5).float()
    x = pick * blurred + (1 - pick) * x
    scale = torch.rand(x.shape[0], 1, 1, 1, generator=generator) * 0.1
    x = x + scale * torch.randn(x.shape, generator=generator)
    gain = 0.7 + 0.5 * torch.rand(x.shape[0], 1, 1, 1, generator=generator)
    return (x * gain).clamp(0, 1)


def fit_shape_classifier(
    samples: int = CLASSIFIER_SAMPLES, epochs: int = 6, seed: int = CLASSIFIER_SEED
) -> ShapeClassifier:
    """Fit the classifier on ``samples`` synthetic images (deterministic in ``seed``, ~1 min on 2 cores)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = ShapesDataset(seed=seed).arrays(0, samples)
    x = _chroma_batch(list(images))
    y = torch.tensor([SHAPES.index(label.shape) for label in labels])
    model = ShapeClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = 128
    steps = epochs * (samples // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    for _epoch in range(epochs):
        order = torch.randperm(samples, generator=generator)
        for start in range(0, samples - batch + 1, batch):
            index = order[start : start + batch]
            loss = nn.functional.cross_entropy(model(_augment(x[index], generator)), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def save_shape_classifier(model: ShapeClassifier, path: Path = CLASSIFIER_FILE) -> None:
    from safetensors.torch import save_file

    state = {key: value.detach().to(torch.float16).contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(path), metadata={"classes": ",".join(SHAPES), "seed": str(CLASSIFIER_SEED)})


@lru_cache(maxsize=1)
def shape_classifier() -> ShapeClassifier:
    """The shipped classifier (refit deterministically if the weights file is missing)."""
    model = ShapeClassifier()
    if CLASSIFIER_FILE.is_file():
        from safetensors.torch import load_file

        state = {key: value.float() for key, value in load_file(str(CLASSIFIER_FILE)).items()}
        model.load_state_dict(state)
        return model.eval()
    return fit_shape_classifier()


def classify_shapes(images: Sequence[Image.Image | np.ndarray]) -> list[str]:
    """The shape each image shows, one of :data:`SHAPES`."""
    if not images:
        return []
    with torch.no_grad():
        logits = shape_classifier()(_chroma_batch(images))
    return [SHAPES[int(i)] for i in logits.argmax(dim=1)]


# ------------------------------------------------------------------ style metrics

STYLE_CHROMA = 0.2  # a pixel belongs to the shape (for the style metrics) above this chroma
STRIPE_GAP = STRIPE_PERIOD // 2  # rows of background between two stripes of the striped style
TOP_PIXELS = 30  # an image with fewer shape pixels is judged on its most colored pixels


def stripe_anisotropy(image: Image.Image | np.ndarray) -> float:
    """``(Ey - Ex) / (Ey + Ex)`` of the chroma map's squared gradients along y and x; in [-1, 1].

    Horizontal stripes make the color change row to row but not along a row,
    so vertical gradients dominate (drawn striped shapes: ~0.77); a solid
    shape's outline changes as much along x as along y (~0). Neutral
    background texture has no chroma, so it adds nothing. Unlike a spectral
    measure it needs no exact stripe period: generated stripes are softer and
    not exactly 8 px apart.
    """
    c = chroma(image)
    along_y = float((np.diff(c, axis=0) ** 2).sum())
    along_x = float((np.diff(c, axis=1) ** 2).sum())
    total = along_y + along_x
    return (along_y - along_x) / total if total > 1e-9 else 0.0


def _shape_mask(c: np.ndarray) -> np.ndarray:
    """Pixels that belong to the shape: chroma above half the image's near-maximum (and above a floor)."""
    high = float(np.percentile(c, 99.5))
    return c > max(STYLE_CHROMA, 0.5 * high)


def _close_vertically(mask: np.ndarray, length: int) -> np.ndarray:
    """Morphological closing of a boolean (H, W) mask along y only: gaps shorter than ``length`` rows fill.

    ``length`` is odd (a centered window); rows beyond the image count as background.
    """
    if length < 1 or length % 2 == 0:
        raise ValueError(f"closing length must be odd and positive, not {length}")
    reach = length // 2
    rows = mask.shape[0] + 2 * length
    framed = np.pad(mask, ((length, length), (0, 0)))

    def slide(values: np.ndarray, reduce) -> np.ndarray:
        padded = np.pad(values, ((reach, reach), (0, 0)))
        return reduce([padded[i : i + rows] for i in range(length)], axis=0)

    return slide(slide(framed, np.max), np.min)[length:-length]


def _without_specks(mask: np.ndarray, smallest: int = MIN_SHAPE_PIXELS) -> np.ndarray:
    """``mask`` without its 8-connected pieces of fewer than ``smallest`` pixels (stray colored noise)."""
    kept = mask.copy()
    seen = np.zeros_like(mask)
    height, width = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        piece, stack = [], [start]
        while stack:
            y, x = stack.pop()
            piece.append((y, x))
            for ny in range(max(y - 1, 0), min(y + 2, height)):
                for nx in range(max(x - 1, 0), min(x + 2, width)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        if len(piece) < smallest:
            kept[tuple(np.array(piece).T)] = False
    return kept


def hollowness(image: Image.Image | np.ndarray) -> float:
    """Share of the shape's row spans that is not colored: ~0 for a solid shape, large for an outline.

    Each row's span runs from its first to its last shape pixel; an outline
    colors only the two ends of most spans, a solid fill all of it. Rows are
    first closed vertically over :data:`STRIPE_GAP` + 1 rows, so horizontal
    stripes (which drop whole rows, or with generated soft and wavy stripes,
    parts of rows) read as solid; an outline's inside is taller than that for
    every size of shape. Unlike a flood fill it needs no closed outline:
    generated outlines often have breaks. After the closing, specks (pieces of
    fewer than :data:`MIN_SHAPE_PIXELS` pixels) are dropped: one stray colored
    pixel far from the shape would otherwise stretch its row's span.
    """
    mask = _without_specks(_close_vertically(_shape_mask(chroma(image)), STRIPE_GAP + 1))
    colored = span = 0
    for row in mask:
        columns = np.flatnonzero(row)
        if columns.size:
            colored += columns.size
            span += int(columns[-1] - columns[0]) + 1
    if colored < MIN_SHAPE_PIXELS:
        return 0.0
    return 1.0 - colored / span


def lightness(image: Image.Image | np.ndarray) -> float:
    """Mean HSL lightness, (max + min) / 2, of the shape's pixels; pastel colors are lighter."""
    rgb = _as_array(image)
    c = rgb.max(axis=-1) - rgb.min(axis=-1)
    mask = c > STYLE_CHROMA
    if int(mask.sum()) < TOP_PIXELS:
        mask = c >= np.sort(c, axis=None)[-TOP_PIXELS]
    pixels = rgb[mask]
    return float((pixels.max(axis=-1) + pixels.min(axis=-1)).mean() / 2.0)


STYLE_METRICS = {"striped": stripe_anisotropy, "outlined": hollowness, "pastel": lightness}
# Above the threshold an image reads as the style (fitted on drawn images; see tests/toy/test_styles.py).
STYLE_THRESHOLDS = {"striped": 0.3, "outlined": 0.2, "pastel": 0.59}


def style_metric(style: str, images: Sequence[Image.Image | np.ndarray]) -> float:
    """Mean of ``style``'s metric over ``images``."""
    if style not in STYLE_METRICS:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLE_METRICS)}")
    if not images:
        raise ValueError("style_metric needs at least one image")
    measure = STYLE_METRICS[style]
    return float(np.mean([measure(image) for image in images]))


@dataclass(frozen=True)
class Accuracy:
    """Color, shape and (when asked) background accuracy over ``count`` images, as fractions in [0, 1]."""

    color: float
    shape: float
    count: int
    background: float | None = None  # None: no backgrounds were given


def accuracy(
    images: Sequence[Image.Image | np.ndarray],
    colors: Sequence[str],
    shapes: Sequence[str],
    backgrounds: Sequence[str] | None = None,
) -> Accuracy:
    """How many images show the asked color / shape / background (the last only if ``backgrounds``)."""
    if not (len(images) == len(colors) == len(shapes)) or not images:
        raise ValueError("accuracy needs one color and one shape per image, and at least one image")
    if backgrounds is not None and len(backgrounds) != len(images):
        raise ValueError("accuracy needs one background per image")
    color_hits = sum(dominant_color(image) == color for image, color in zip(images, colors, strict=True))
    shape_hits = sum(guess == shape for guess, shape in zip(classify_shapes(images), shapes, strict=True))
    count = len(images)
    background = None
    if backgrounds is not None:
        hits = sum(background_of(image) == asked for image, asked in zip(images, backgrounds, strict=True))
        background = hits / count
    return Accuracy(color=color_hits / count, shape=shape_hits / count, count=count, background=background)


def main() -> None:
    parser = argparse.ArgumentParser(description="Refit the toy shape classifier and report its accuracy.")
    parser.add_argument("--refit", action="store_true", help=f"rewrite {CLASSIFIER_FILE.name}")
    args = parser.parse_args()
    started = time.perf_counter()
    model = fit_shape_classifier()
    print(f"fitted in {time.perf_counter() - started:.1f}s")
    if args.refit:
        save_shape_classifier(model)
        shape_classifier.cache_clear()
    images, labels = ShapesDataset(seed=1).arrays(0, 1000)
    result = accuracy(
        list(images),
        [lab.color for lab in labels],
        [lab.shape for lab in labels],
        [lab.background for lab in labels],
    )
    print(
        f"on 1000 held-out drawn images: color {result.color:.3f}, shape {result.shape:.3f}, "
        f"background {result.background:.3f}"
    )


if __name__ == "__main__":
    main()
