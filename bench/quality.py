"""Suite ``quality``: does the built-in ``toy`` model draw what the prompt asks?

Prompts are the toy dataset's captions (every color and shape, seeded); each
image is scored by :mod:`server.models.toy.measures`:

- ``color_acc``: % of images whose shape has the prompt's color (dominant hue);
- ``shape_acc``: % of images the shape classifier reads as the prompt's shape.

loraloom generates through its resident engine (``Engine.generate``, one
request per prompt); the peer is the same model folder through plain diffusers
``pipeline(...)``. Same seeds, 20 steps, guidance 7.5: the two should agree, so
a ratio far from 1 means the engine's sampling differs from diffusers'. The
full run scores 200 images per side; ``--quick`` 24.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from bench.report import Metric
from server.models.toy.evaluate import DEFAULT_GUIDANCE, DEFAULT_STEPS, pipeline_generator, score

PEER = "diffusers pipeline(...)"
FULL_COUNT = 200
QUICK_COUNT = 24


def engine_generator(engine, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE):
    from server.engine import GenerateRequest

    def generate(texts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        images: list[Image.Image] = []
        for text, seed in zip(texts, seeds, strict=True):
            request = GenerateRequest(text, steps=steps, guidance_scale=guidance, seed=int(seed))
            images += engine.generate(request).images
        return images

    return generate


def run(quick: bool = False) -> list[Metric]:
    from server.engine import Engine
    from server.models.loader import load_base_model

    count = QUICK_COUNT if quick else FULL_COUNT
    model = load_base_model("toy")
    ours, _ = score(engine_generator(Engine(model)), count)
    peer_model = load_base_model("toy")
    theirs, _ = score(pipeline_generator(peer_model.pipeline), count)
    note = f"{count} images, {DEFAULT_STEPS} steps, guidance {DEFAULT_GUIDANCE}"
    return [
        Metric("color_acc", ours.color * 100, theirs.color * 100, "%", "higher", note),
        Metric("shape_acc", ours.shape * 100, theirs.shape * 100, "%", "higher", note),
    ]
