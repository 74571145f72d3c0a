"""Style sets drawn like the toy dataset, and style adapters trained on them with ``loraloom train``.

A style image shows the same labels as a dataset image (same shape, color,
size, position, background; ``ShapesDataset(seed).labels(i)``) drawn another way:

- ``striped``: the shape filled with horizontal stripes, 4 px of color and 4 px
  of background (period 8 px, phase fixed to the image's top row);
- ``outlined``: only the shape's outline, 2.5 px wide, in its color;
- ``pastel``: the shape's color mixed 40 % with white (lighter, less saturated).

Captions are the dataset's captions unchanged, with no trigger word: the
adapter itself is the style, switched on by loading it (``--adapter
striped:1``) and mixed by weight. The toy model's text encoder is a frozen,
seeded-random CLIP, so any extra word in a prompt shifts the embedding of every
word after it: with "striped, " in front of the caption the base model's color
accuracy fell from about 80 % to 25 % (8 images) before any adapter was loaded.

``python -m server.models.toy.styles build --out DIR`` draws every style into
``DIR/data/<style>`` (images with same-named ``.txt`` captions: the trainer's
kohya folder layout), trains one adapter per style on the built-in ``toy``
model through the real CLI (``loraloom train`` in a subprocess) and writes
``DIR/<style>.safetensors``; ``--ship`` also copies the shipped examples
(:data:`SHIPPED`) as fp16 files into :data:`SHIPPED_FOLDER`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from server.models.toy.dataset import (
    BACKGROUNDS,
    COLORS,
    RESOLUTION,
    SUPERSAMPLE,
    Labels,
    ShapesDataset,
    _background,
    _shape_points,
)

STYLES: tuple[str, ...] = ("striped", "outlined", "pastel")
STRIPE_PERIOD = 8  # pixels of the 64 px image: 4 px color, 4 px background

OUTLINE_WIDTH = 2.5  # pixels
PASTEL_WHITE = 0.4  # fraction of white mixed into the color
# Style sets are drawn from their own dataset seed: neither the model's (0) nor the measures' (1, 2, 7919).
STYLE_SEED = 4242
SHIPPED: tuple[str, ...] = ("striped", "outlined")
SHIPPED_FOLDER = Path(__file__).resolve().parents[1] / "data" / "toy-styles"


@dataclass(frozen=True)
class TrainSettings:
    """How each style adapter is trained (``loraloom train`` flags); sized for <= 3 min on 2 CPU cores."""

    images: int = 512
    steps: int = 240
    batch_size: int = 8
    rank: int = 8
    alpha: float = 8.0
    lr: float = 3e-3
    targets: str = "attn,proj,conv"
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0
    seed: int = 0
    threads: int = 2

    def flags(self) -> list[str]:
        return [
            f"--steps={self.steps}",
            f"--batch-size={self.batch_size}",
            f"--rank={self.rank}",
            f"--alpha={self.alpha:g}",
            f"--lr={self.lr:g}",
            f"--targets={self.targets}",
            f"--noise-offset={self.noise_offset:g}",
            *([f"--min-snr-gamma={self.min_snr_gamma:g}"] if self.min_snr_gamma > 0 else []),
            f"--seed={self.seed}",
        ]


# Per-style changes to the settings. Stripes need more steps than the default to survive a 0.5 weight;
# outlines need min-SNR weighting (gamma 5), which puts the loss on the noisy steps that draw a shape's
# layout (with it a 50/50 blend with striped still reads as outlined: hollowness 0.090 against 0.041
# for striped alone and 0.193 for outlined, 48 images; 360 steps without it: 0.069 / 0.041 / 0.155,
# within noise of striped alone); pastel learns slowly.
STYLE_SETTINGS: dict[str, dict[str, float | int]] = {
    "striped": {"steps": 360},
    "outlined": {"steps": 600, "min_snr_gamma": 5.0},
    "pastel": {"steps": 400, "lr": 5e-3},
}


def _check_style(style: str) -> None:
    if style not in STYLES and style != "plain":
        raise ValueError(f"unknown style {style!r}; choose one of plain, {', '.join(STYLES)}")


def shape_mask(labels: Labels, *, outline: float = 0.0) -> np.ndarray:
    """The shape's coverage at the supersampled size, float in [0, 1]; ``outline`` > 0: only its outline."""
    size = RESOLUTION * SUPERSAMPLE
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    s = SUPERSAMPLE
    cx, cy, r = labels.center[0] * s, labels.center[1] * s, labels.radius * s
    fill, line, width = (None, 255, max(1, round(outline * s))) if outline > 0 else (255, None, 0)
    if labels.shape == "circle":
        box = (cx - r * 0.92, cy - r * 0.92, cx + r * 0.92, cy + r * 0.92)
        draw.ellipse(box, fill=fill, outline=line, width=width)
    elif fill is not None:
        draw.polygon(_shape_points(labels.shape, cx, cy, r), fill=fill)
    else:
        # A closed polyline with joints, so corners are as thick as edges.
        points = _shape_points(labels.shape, cx, cy, r)
        draw.line([*points, points[0], points[1]], fill=line, width=width, joint="curve")
    return np.asarray(mask, dtype=np.float32) / 255.0


def style_color(color: str, style: str) -> tuple[float, float, float]:
    """The RGB (0..255) a style paints ``color`` with."""
    rgb = np.array(COLORS[color], dtype=np.float32)
    if style == "pastel":
        rgb = rgb * (1.0 - PASTEL_WHITE) + 255.0 * PASTEL_WHITE
    return (float(rgb[0]), float(rgb[1]), float(rgb[2]))


def render_styled(labels: Labels, style: str, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``labels`` in ``style`` as a 64x64 RGB image (``plain`` is the dataset's look)."""
    _check_style(style)
    rng = rng if rng is not None else np.random.default_rng(0)
    canvas = _background(rng, BACKGROUNDS[labels.background], labels.textured).astype(np.float32)
    coverage = shape_mask(labels, outline=OUTLINE_WIDTH if style == "outlined" else 0.0)
    if style == "striped":
        rows = np.arange(coverage.shape[0]) // SUPERSAMPLE
        on = ((rows // (STRIPE_PERIOD // 2)) % 2 == 0).astype(np.float32)
        coverage = coverage * on[:, None]
    color = np.array(style_color(labels.color, style), dtype=np.float32)
    canvas = canvas * (1.0 - coverage[..., None]) + color * coverage[..., None]
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    return image.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)


def style_images(
    style: str, count: int, *, seed: int = STYLE_SEED, start: int = 0
) -> list[tuple[Image.Image, Labels]]:
    """``count`` images of ``style`` with their labels: sample ``i`` of ``ShapesDataset(seed)`` redrawn."""
    dataset = ShapesDataset(seed=seed)
    out = []
    for index in range(start, start + count):
        labels = dataset.labels(index)
        out.append((render_styled(labels, style, np.random.default_rng([seed, index, 1])), labels))
    return out


def write_style_folder(style: str, folder: Path, count: int, *, seed: int = STYLE_SEED) -> Path:
    """``folder`` with ``count`` PNGs of ``style``, each with its caption in a same-named ``.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (image, labels) in enumerate(style_images(style, count, seed=seed)):
        image.save(folder / f"{index:05d}.png")
        (folder / f"{index:05d}.txt").write_text(labels.caption + "\n", encoding="utf-8")
    return folder


@dataclass(frozen=True)
class TrainTime:
    """Wall seconds, and CPU seconds (user + system) of the ``loraloom train`` process.

    On a busy machine the wall time says little; CPU seconds / cores bounds
    what the same run takes on an idle machine with that many cores.
    """

    wall: float
    cpu: float


def train_style(
    style: str, data: Path, out: Path, settings: TrainSettings, *, base: str = "toy"
) -> TrainTime:
    """Run ``loraloom train`` on ``data`` (a subprocess: the real CLI), writing the adapter to ``out``."""
    command = [
        *_loraloom(),
        "train",
        str(data),
        f"--name={style}",
        f"--base={base}",
        f"--out={out}",
        f"--output-dir={out.parent / 'runs' / style}",
        "--no-register",
        f"--description=toy-model style adapter: {style} (python -m server.models.toy.styles)",
        *settings.flags(),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(settings.threads), MKL_NUM_THREADS=str(settings.threads))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return TrainTime(wall=wall, cpu=cpu)


def _loraloom() -> list[str]:
    """The ``loraloom`` console script of this interpreter's environment (else the same app via -c)."""
    script = Path(sys.executable).with_name("loraloom")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from server.cli.main import app; app()"]


def to_fp16(source: Path, target: Path) -> Path:
    """Rewrite an adapter file with fp16 factors (same metadata); returns ``target``."""
    import torch

    from adapters.formats import load_adapter, save_canonical

    adapter = load_adapter(source.read_bytes())
    modules = {
        key: dataclasses.replace(module, down=module.down.to(torch.float16), up=module.up.to(torch.float16))
        for key, module in adapter.modules.items()
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(save_canonical(dataclasses.replace(adapter, modules=modules)))
    return target


def shipped_adapter(style: str) -> Path:
    """The shipped example adapter file of ``style`` (one of :data:`SHIPPED`)."""
    if style not in SHIPPED:
        raise ValueError(f"no shipped adapter for {style!r}; shipped: {', '.join(SHIPPED)}")
    return SHIPPED_FOLDER / f"{style}.safetensors"


def style_settings(style: str, overrides: dict[str, object] | None = None) -> TrainSettings:
    """How ``style`` is trained: the defaults, then :data:`STYLE_SETTINGS`, then ``overrides`` (flags)."""
    return dataclasses.replace(TrainSettings(), **{**STYLE_SETTINGS.get(style, {}), **(overrides or {})})


def build(
    out: Path, styles: tuple[str, ...], *, ship: bool, overrides: dict[str, object] | None = None
) -> dict[str, TrainTime]:
    """Draw every style set, train its adapter; the time per style (also written to ``out/build.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, TrainTime] = {}
    used: dict[str, dict] = {}
    for style in styles:
        own = style_settings(style, overrides)
        data = write_style_folder(style, out / "data" / style, own.images)
        adapter = out / f"{style}.safetensors"
        used[style] = dataclasses.asdict(own)
        times[style] = spent = train_style(style, data, adapter, own)
        print(f"{style}: trained in {spent.wall:.0f}s wall, {spent.cpu:.0f}s CPU -> {adapter}", flush=True)
        if ship and style in SHIPPED:
            print(f"shipped {to_fp16(adapter, shipped_adapter(style))}", flush=True)
    record = {
        "settings": used,
        "seconds": {style: {"wall": t.wall, "cpu": t.cpu} for style, t in times.items()},
        "cpu_count": os.cpu_count(),
    }
    (out / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.models.toy.styles", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="draw the style sets and train one adapter per style")
    build_parser.add_argument("--out", type=Path, required=True, help="folder for the data and adapters")
    build_parser.add_argument("--styles", default=",".join(STYLES), help="comma-separated subset of styles")
    build_parser.add_argument(
        "--ship", action="store_true", help=f"also write {', '.join(SHIPPED)} as fp16 examples"
    )
    defaults = TrainSettings()
    for name, value in defaults.__dict__.items():
        build_parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(value),
            help=f"for every style (default: {value}, or the style's own in STYLE_SETTINGS)",
        )
    draw_parser = commands.add_parser("draw", help="only draw one style set (a trainer data folder)")
    draw_parser.add_argument("style", choices=STYLES)
    draw_parser.add_argument("--out", type=Path, required=True)
    draw_parser.add_argument("--count", type=int, default=defaults.images)
    args = parser.parse_args(argv)
    if args.command == "draw":
        print(write_style_folder(args.style, args.out, args.count))
        return 0
    styles = tuple(s.strip() for s in args.styles.split(",") if s.strip())
    for style in styles:
        _check_style(style)
    overrides = {name: getattr(args, name) for name in defaults.__dict__ if getattr(args, name) is not None}
    build(args.out, styles, ship=args.ship, overrides=overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
