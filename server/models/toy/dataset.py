"""A deterministic synthetic dataset: 64x64 shapes in named colors, with captions.

Every sample is a function of ``(seed, index)`` only: one saturated shape
(circle, square, triangle, star, cross) in one of six hues 60 degrees apart, small
or large, somewhere on a neutral (white, gray or black) background that is plain
or lightly textured. Shapes are drawn at 4x and downsampled, so edges are
anti-aliased. The caption names all of it in one fixed template::

    a small red circle on a white background
    a large blue star on a textured black background
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 64
SUPERSAMPLE = 4

# Six hues 60 degrees apart, fully saturated: any two differ at a glance and in the hue measure.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "yellow": (235, 215, 20),
    "green": (30, 190, 40),
    "cyan": (20, 200, 215),
    "blue": (30, 50, 225),
    "magenta": (215, 30, 200),
}
COLOR_HUES: dict[str, float] = {
    "red": 0.0,
    "yellow": 60.0,
    "green": 120.0,
    "cyan": 180.0,
    "blue": 240.0,
    "magenta": 300.0,
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SIZES: dict[str, tuple[float, float]] = {"small": (10.0, 13.0), "large": (18.0, 24.0)}
BACKGROUNDS: dict[str, int] = {"white": 240, "gray": 128, "black": 20}


@dataclass(frozen=True)
class Labels:
    """What a sample shows; ``center`` and ``radius`` are in pixels of the 64 px image."""

    color: str
    shape: str
    size: str
    background: str
    textured: bool
    center: tuple[float, float]
    radius: float

    @property
    def caption(self) -> str:
        return caption_for(
            self.color, self.shape, size=self.size, background=self.background, textured=self.textured
        )


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    labels: Labels


def caption_for(
    color: str, shape: str, *, size: str = "large", background: str = "white", textured: bool = False
) -> str:
    """The caption template the toy model was trained on."""
    texture = "textured " if textured else ""
    return f"a {size} {color} {shape} on a {texture}{background} background"


def all_captions() -> list[str]:
    """Every caption the dataset can produce (a finite set), in a fixed order."""
    return [
        caption_for(color, shape, size=size, background=background, textured=textured)
        for size in SIZES
        for color in COLORS
        for shape in SHAPES
        for background in BACKGROUNDS
        for textured in (False, True)
    ]


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        w = r * 0.33
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def _background(rng: np.random.Generator, tone: int, textured: bool) -> np.ndarray:
    size = RESOLUTION * SUPERSAMPLE
    canvas = np.full((size, size), float(tone), dtype=np.float32)
    if textured:
        # Faint diagonal stripes plus fine noise, neutral (no hue) so it never reads as a color.
        period = rng.uniform(6.0, 12.0) * SUPERSAMPLE
        phase = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        canvas += 14.0 * np.sin(2 * math.pi * (xx + yy) / period + phase)
        noise = rng.normal(0.0, 9.0, size=(RESOLUTION, RESOLUTION)).astype(np.float32)
        canvas += np.kron(noise, np.ones((SUPERSAMPLE, SUPERSAMPLE), dtype=np.float32))
    return np.repeat(np.clip(canvas, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def render(labels: Labels, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``labels`` as a 64x64 RGB image (texture noise from ``rng``)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    canvas = Image.fromarray(_background(rng, BACKGROUNDS[labels.background], labels.textured))
    draw = ImageDraw.Draw(canvas)
    s = SUPERSAMPLE
    cx, cy, r = labels.center[0] * s, labels.center[1] * s, labels.radius * s
    fill = COLORS[labels.color]
    if labels.shape == "circle":
        draw.ellipse((cx - r * 0.92, cy - r * 0.92, cx + r * 0.92, cy + r * 0.92), fill=fill)
    else:
        draw.polygon(_shape_points(labels.shape, cx, cy, r), fill=fill)
    return canvas.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)


@dataclass(frozen=True)
class ShapesDataset:
    """Index -> :class:`Sample`, a pure function of ``(seed, index)``."""

    seed: int = 0
    length: int = 100_000

    def __len__(self) -> int:
        return self.length

    def labels(self, index: int) -> Labels:
        return _draw_labels(np.random.default_rng([self.seed, index, 0]))

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length}")
        labels = self.labels(index)
        image = render(labels, np.random.default_rng([self.seed, index, 1]))
        return Sample(image=image, caption=labels.caption, labels=labels)

    def arrays(self, start: int, count: int) -> tuple[np.ndarray, list[Labels]]:
        """``count`` samples from ``start`` as one uint8 array (N, 64, 64, 3) and their labels."""
        images = np.empty((count, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
        labels = []
        for offset in range(count):
            sample = self[start + offset]
            images[offset] = np.asarray(sample.image)
            labels.append(sample.labels)
        return images, labels


def _draw_labels(rng: np.random.Generator) -> Labels:
    color = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    textured = bool(rng.integers(2))
    low, high = SIZES[size]
    radius = float(rng.uniform(low, high))
    margin = radius + 2.0
    center = (
        float(rng.uniform(margin, RESOLUTION - margin)),
        float(rng.uniform(margin, RESOLUTION - margin)),
    )
    return Labels(
        color=color,
        shape=shape,
        size=size,
        background=background,
        textured=textured,
        center=center,
        radius=radius,
    )
