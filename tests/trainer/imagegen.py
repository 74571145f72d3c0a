"""Small generated training folders: simple coloured shapes drawn with Pillow."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}


def draw(shape: str, colour: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", size, (245, 245, 240))
    pen = ImageDraw.Draw(image)
    w, h = size
    r = min(w, h) * rng.uniform(0.25, 0.4)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def make_folder(
    root: Path,
    count: int = 16,
    *,
    size: tuple[int, int] = (48, 48),
    convention: str = "kohya",
    sizes: list[tuple[int, int]] | None = None,
) -> Path:
    """``count`` shape images with captions like ``red circle, shape, flat``."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        colour = list(COLOURS)[i % len(COLOURS)]
        image_size = sizes[i % len(sizes)] if sizes else size
        name = f"img{i:03d}.png"
        draw(shape, colour, image_size, seed=i).save(root / name)
        caption = f"{colour} {shape}, shape, flat"
        if convention == "kohya":
            (root / name).with_suffix(".txt").write_text(caption)
        else:
            records.append({"file_name": name, "text": caption})
    if convention != "kohya":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root
