"""Suite ``quality``: does the built-in ``toy`` model draw what the prompt asks, and do style adapters work?

Prompts are the toy dataset's captions (every color and shape, seeded); each
image is scored by :mod:`server.models.toy.measures`.

Base model (loraloom's resident engine vs the same folder through plain
diffusers ``pipeline(...)``, same seeds, 20 steps, guidance 7.5; the two should
agree, so a ratio far from 1 means the engine's sampling differs):

- ``color_acc``: % of images whose shape has the prompt's color (dominant hue);
- ``shape_acc``: % of images the shape classifier reads as the prompt's shape;
- ``background_acc``: % of images whose background (the border ring's median
  color by HSL lightness and saturation: white, gray, black or none) is the prompt's.

Style adapters (:mod:`server.models.toy.styles`; the shipped examples, or every
``<style>.safetensors`` in ``$LORALOOM_STYLE_ADAPTERS``, a ``styles build``
output folder, together with variants of a style trained another way, named
``<style>-<variant>.safetensors`` (``striped-loha``, ``striped-lokr``,
``striped-cached``: judged on their style's metric)), all through the engine,
the same plain captions and seeds with and without the adapter (style adapters
have no trigger word):

- ``style_<s>``: the style's metric with the adapter (loraloom) and without it
  (peer: the base model on the same prompts); the ratio is the factor it moves;
- ``style_<s>_color_acc``: color accuracy with the adapter (peer: without);
- ``blend_<a>+<b>_<s>``: a 50/50 blend (0.5 + 0.5) of the first two adapters,
  its metric of style ``s`` (loraloom) against the midpoint of the two parents'
  (peer); the note gives both parents and says whether the blend lies between;
- ``blend_0.75<a>+0.25<b>_<s>`` and ``blend_0.25<a>+0.75<b>_<s>``: the same at
  other weights against the parents' weighted mean; the note gives the metric
  as ``a``'s weight goes 1 -> 0 and says whether it follows the weights.

The full run scores 200 images per side for the base model and 48 per style
setting; ``--quick`` 24 and 8.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from PIL import Image

from bench.report import Metric
from server.models.toy.evaluate import DEFAULT_GUIDANCE, DEFAULT_STEPS, pipeline_generator, prompts, score

PEER = "diffusers pipeline(...) / the base model without the adapter"
FULL_COUNT = 200
QUICK_COUNT = 24
STYLE_FULL_COUNT = 48
STYLE_QUICK_COUNT = 8
STYLE_ADAPTERS_ENV = "LORALOOM_STYLE_ADAPTERS"
BATCH = 8


def engine_generator(engine, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE):
    """One engine request per prompt, as a server would run them (batch size 1)."""
    from server.engine import GenerateRequest

    def generate(texts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        images: list[Image.Image] = []
        for text, seed in zip(texts, seeds, strict=True):
            request = GenerateRequest(text, steps=steps, guidance_scale=guidance, seed=int(seed))
            images += engine.generate(request).images
        return images

    return generate


def generate_with_blend(
    engine,
    texts: Sequence[str],
    seeds: Sequence[int],
    blend: Sequence[tuple[str, float]] = (),
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch: int = BATCH,
) -> list[Image.Image]:
    """Images of ``texts`` under ``blend`` (adapter refs the engine's resolver knows), batched per blend."""
    from server.engine import GenerateRequest
    from server.engine.engine import BatchEntry

    images: list[Image.Image] = []
    for start in range(0, len(texts), batch):
        entries = [
            BatchEntry(
                engine.job(
                    GenerateRequest(
                        text, steps=steps, guidance_scale=guidance, seed=int(seed), adapters=list(blend)
                    )
                )
            )
            for text, seed in zip(texts[start : start + batch], seeds[start : start + batch], strict=True)
        ]
        for outcome in engine.generate_batch(entries):
            if isinstance(outcome, Exception):
                raise outcome
            images += outcome.images
    return images


@dataclass(frozen=True)
class StyleScore:
    """One blend's images scored: every style's metric, and color accuracy."""

    metrics: dict[str, float]
    color: float


def score_styles(images: Sequence[Image.Image], colors: Sequence[str], styles: Sequence[str]) -> StyleScore:
    from server.models.toy.measures import dominant_color, style_metric

    hits = sum(dominant_color(image) == color for image, color in zip(images, colors, strict=True))
    return StyleScore({style: style_metric(style, images) for style in styles}, hits / len(images))


def measured_style(name: str) -> str:
    """The style an adapter named ``<style>`` or ``<style>-<variant>`` (``striped-loha``) is judged on."""
    return name.split("-", 1)[0]


def style_adapter_files() -> dict[str, Path]:
    """Adapter name -> file: ``$LORALOOM_STYLE_ADAPTERS/<style>.safetensors`` and variants of a style
    trained another way (``<style>-<variant>.safetensors``: ``striped-loha``, ``striped-cached``...),
    else the shipped ones."""
    from server.models.toy.styles import SHIPPED, STYLES, shipped_adapter

    folder = os.environ.get(STYLE_ADAPTERS_ENV)
    if folder:
        found = {
            path.stem: path
            for path in sorted(Path(folder).glob("*.safetensors"))
            if measured_style(path.stem) in STYLES
        }
        if not found:
            raise FileNotFoundError(
                f"{STYLE_ADAPTERS_ENV}={folder} has no <style>.safetensors; "
                "run python -m server.models.toy.styles build --out DIR first"
            )
        return found
    return {style: shipped_adapter(style) for style in SHIPPED}


def style_metrics(count: int) -> list[Metric]:
    from server.engine import Engine
    from server.engine.resolvers import MemoryResolver
    from server.models.loader import load_base_model

    files = style_adapter_files()
    resolver = MemoryResolver()
    for style, path in files.items():
        resolver.add_file(style, path)
    engine = Engine(load_base_model("toy"), resolver=resolver)
    asked = prompts(count, seed=1)
    seeds = [1000 + i for i in range(count)]
    colors = [p.color for p in asked]
    styles = list(dict.fromkeys(measured_style(name) for name in files))

    texts = [p.text for p in asked]

    def run(blend: Sequence[tuple[str, float]]) -> StyleScore:
        return score_styles(generate_with_blend(engine, texts, seeds, blend), colors, styles)

    metrics: list[Metric] = []
    with_adapter: dict[str, StyleScore] = {}
    note = f"{count} images, {DEFAULT_STEPS} steps, guidance {DEFAULT_GUIDANCE}; peer: no adapter"
    base = run(())
    for name in files:
        style = measured_style(name)
        with_adapter[name] = tuned = run(((name, 1.0),))
        label = name.replace("-", "_")
        metrics.append(
            Metric(f"style_{label}", tuned.metrics[style], base.metrics[style], "score", "higher", note)
        )
        metrics.append(
            Metric(f"style_{label}_color_acc", tuned.color * 100, base.color * 100, "%", "higher", note)
        )
    plain = [name for name in files if name == measured_style(name)]
    if len(plain) >= 2:
        metrics += blend_metrics(plain[0], plain[1], with_adapter, run)
    return metrics


BLEND_SWEEP = ((0.75, 0.25), (0.25, 0.75))  # besides 50/50: does the mix follow the weights?


def blend_metrics(a: str, b: str, alone: dict[str, StyleScore], run) -> list[Metric]:
    """The 50/50 blend of ``a`` and ``b`` against its parents, and the sweep of :data:`BLEND_SWEEP`."""
    metrics: list[Metric] = []
    mixed = run(((a, 0.5), (b, 0.5)))
    for style in (a, b):
        ends = (alone[a].metrics[style], alone[b].metrics[style])
        value = mixed.metrics[style]
        between = min(ends) < value < max(ends)
        metrics.append(
            Metric(
                f"blend_{a}+{b}_{style}",
                value,
                sum(ends) / 2,
                "score",
                "higher",
                f"0.5 {a} + 0.5 {b}; parents {ends[0]:.3f} ({a}) / {ends[1]:.3f} ({b}); "
                f"between: {'yes' if between else 'NO'}; peer: the parents' midpoint",
            )
        )
    metrics.append(
        Metric(
            f"blend_{a}+{b}_color_acc",
            mixed.color * 100,
            (alone[a].color + alone[b].color) * 50,
            "%",
            "higher",
            "peer: the parents' mean",
        )
    )
    # a's weight from 1 down to 0: each style's metric should follow its own adapter's weight.
    ladder = {1.0: alone[a], 0.5: mixed, 0.0: alone[b]}
    for weight_a, weight_b in BLEND_SWEEP:
        ladder[weight_a] = run(((a, weight_a), (b, weight_b)))
    weights = sorted(ladder, reverse=True)
    for style in (a, b):
        values = [ladder[w].metrics[style] for w in weights]
        falling = all(x > y for x, y in pairwise(values))
        rising = all(x < y for x, y in pairwise(values))
        follows = falling if style == a else rising
        path = " -> ".join(f"{v:.3f}" for v in values)
        for weight_a, weight_b in BLEND_SWEEP:
            linear = weight_a * alone[a].metrics[style] + weight_b * alone[b].metrics[style]
            metrics.append(
                Metric(
                    f"blend_{weight_a:g}{a}+{weight_b:g}{b}_{style}",
                    ladder[weight_a].metrics[style],
                    linear,
                    "score",
                    "higher",
                    f"{a} weight 1 -> 0: {path}; follows the weights: {'yes' if follows else 'NO'}; "
                    "peer: the parents' weighted mean",
                )
            )
    return metrics


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
        Metric("background_acc", ours.background * 100, theirs.background * 100, "%", "higher", note),
        *style_metrics(STYLE_QUICK_COUNT if quick else STYLE_FULL_COUNT),
    ]
