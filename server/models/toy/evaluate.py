"""Generate from the toy model and score the images: ``python -m server.models.toy.evaluate``.

Prompts are drawn (seeded) from the dataset's caption set, so every color,
shape, size and background occurs; image ``i`` is generated from seed
``seed + i``. Generation goes through plain diffusers ``pipeline(...)``; the
``quality`` bench suite also runs it through loraloom's engine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from server.models.toy.dataset import COLORS, SHAPES, all_captions
from server.models.toy.measures import Accuracy, accuracy

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5


@dataclass(frozen=True)
class Prompt:
    text: str
    color: str
    shape: str
    background: str = "white"


def prompts(count: int, seed: int = 0) -> list[Prompt]:
    """``count`` captions, seeded; colors and shapes cycle so small counts still cover them all."""
    rng = np.random.default_rng(seed)
    captions = all_captions()
    chosen = []
    for i in range(count):
        color = list(COLORS)[i % len(COLORS)]
        shape = SHAPES[(i // len(COLORS) + i) % len(SHAPES)]
        fitting = [c for c in captions if f" {color} {shape} " in c]
        text = fitting[int(rng.integers(len(fitting)))]
        background = text.removesuffix(" background").rsplit(" ", 1)[-1]
        chosen.append(Prompt(text=text, color=color, shape=shape, background=background))
    return chosen


Generate = Callable[[Sequence[str], Sequence[int]], list[Image.Image]]


def pipeline_generator(pipeline, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> Generate:
    """Images from plain diffusers ``pipeline(...)``, one seeded generator per image."""
    import torch

    def generate(texts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        with torch.no_grad():
            return list(
                pipeline(
                    list(texts),
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=generators,
                ).images
            )

    return generate


def score(
    generate: Generate, count: int, *, seed: int = 0, batch: int = 8
) -> tuple[Accuracy, list[Image.Image]]:
    """Color, shape and background accuracy of ``count`` generated images (prompts from :func:`prompts`)."""
    asked = prompts(count, seed)
    images: list[Image.Image] = []
    for start in range(0, count, batch):
        chunk = asked[start : start + batch]
        images += generate([p.text for p in chunk], [seed + start + i for i in range(len(chunk))])
    result = accuracy(
        images, [p.color for p in asked], [p.shape for p in asked], [p.background for p in asked]
    )
    return result, images


def grid(images: Sequence[Image.Image], columns: int = 8, scale: int = 2) -> Image.Image:
    """The images tiled in rows of ``columns``, each enlarged ``scale`` times (nearest)."""
    size = images[0].width * scale
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * size, rows * size), (255, 255, 255))
    for i, image in enumerate(images):
        enlarged = image.resize((size, size), Image.Resampling.NEAREST)
        sheet.paste(enlarged, ((i % columns) * size, (i // columns) * size))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description="Color, shape and background accuracy of a toy model.")
    parser.add_argument("--model", default="toy", help="built-in name or diffusers folder")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", help="also save the images as one PNG")
    args = parser.parse_args()
    from server.models.loader import load_base_model

    model = load_base_model(args.model)
    started = time.perf_counter()
    generate = pipeline_generator(model.pipeline, args.steps, args.guidance)
    result, images = score(generate, args.count, seed=args.seed)
    seconds = time.perf_counter() - started
    print(
        f"{args.model}: color {result.color:.3f}, shape {result.shape:.3f}, "
        f"background {result.background:.3f} over {result.count} images "
        f"({args.steps} steps, guidance {args.guidance}, {seconds:.0f}s)"
    )
    if args.grid:
        grid(images[:64]).save(args.grid)


if __name__ == "__main__":
    main()
