"""What a person looks at while a run trains: the loss curve and the sample grid, as PNGs.

Both are drawn with Pillow (matplotlib is no dependency of loraloom) and written
atomically next to the checkpoints, so an image viewer that reloads the file never
sees half of one:

- ``loss-curve.png``: every step's loss (light dots) and its smoothed trend (an
  exponential moving average, bias-corrected as TensorBoard's), over the whole
  run's steps, so the empty part on the right is what is left;
- ``sample-grid.png``: one row per validation prompt, one column per sample step
  (the images ``trainer.samples`` wrote; a missing one is a blank cell), labelled
  with the prompt and the step. Small images are enlarged by a whole factor
  (nearest neighbour, pixels stay sharp), large ones reduced to ``MAX_CELL``.

Each PNG records what it shows in text chunks (``loraloom.steps``; the grid's
``loraloom.sample_steps``), which the tests read.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from trainer.samples import sample_path

LOSS_CURVE = "loss-curve.png"
SAMPLE_GRID = "sample-grid.png"

CURVE_SIZE = (800, 400)
CURVE_MARGINS = (64, 34, 20, 40)  # left, top, right, bottom
RAW_COLOR = (150, 180, 220)
TREND_COLOR = (20, 60, 160)
AXIS_COLOR = (90, 90, 90)
GRID_COLOR = (232, 232, 232)
TEXT_COLOR = (30, 30, 30)

LABEL_WIDTH = 180  # the prompt column of the grid
HEADER_HEIGHT = 24  # the step row of the grid
GAP = 4  # between cells (and after the last one)
MIN_CELL = 128
MAX_CELL = 256
MAX_COLUMNS = 16  # more sample steps: evenly spaced ones, the first and the last kept

_STEP_FILE = re.compile(r"^step-(\d+)-(\d+)-.*\.png$")


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _save(image: Image.Image, path: Path, info: dict[str, str]) -> Path:
    """Write ``path`` atomically (a viewer reloading it never reads half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    png = PngInfo()
    png.add_text("Software", "loraloom trainer")
    for key, value in info.items():
        png.add_text(key, value)
    partial = path.with_name(f".{path.name}.partial")
    image.save(partial, format="PNG", pnginfo=png)
    os.replace(partial, path)
    return path


# ---------------------------------------------------------------------------------------- loss curve


def smoothed(values: Sequence[float], beta: float | None = None) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing); by default over
    about a 25th of the run (between 2 and 100 steps)."""
    if beta is None:
        beta = 1 - 1 / max(2.0, min(100.0, len(values) / 25))
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta**count))
    return out


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round values (1, 2 or 5 times a power of ten apart) within ``[low, high]``."""
    if not high > low:
        return [low]
    raw = (high - low) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda candidate: abs(math.log(candidate / raw)))
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + 1e-9 * step:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _label(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def draw_loss_curve(
    losses: Sequence[float], path: Path, *, total_steps: int | None = None, title: str = ""
) -> Path:
    """Draw the loss of steps ``1..len(losses)`` on an x axis of ``total_steps`` into ``path``."""
    width, height = CURVE_SIZE
    left, top, right, bottom = CURVE_MARGINS
    image = Image.new("RGB", CURVE_SIZE, "white")
    pen = ImageDraw.Draw(image)
    font = _font(12)
    steps = len(losses)
    finite = [(step, float(v)) for step, v in enumerate(losses, start=1) if math.isfinite(v)]
    values = [v for _, v in finite]
    trend = list(zip([step for step, _ in finite], smoothed(values), strict=True))
    x_max = max(steps, total_steps or 0, 1)
    if values:
        ordered = sorted(values)
        cut = len(ordered) // 200  # a few early spikes must not flatten the rest
        low, high = ordered[cut], ordered[-1 - cut]
    else:
        low, high = 0.0, 1.0
    pad = (high - low) * 0.05 or abs(high) * 0.05 or 0.05
    low, high = low - pad, high + pad
    plot = (left, top, width - right, height - bottom)

    def x_of(step: float) -> float:
        return plot[0] + (step - 1) / max(1, x_max - 1) * (plot[2] - plot[0])

    def y_of(value: float) -> float:
        value = min(max(value, low), high)
        return plot[3] - (value - low) / (high - low) * (plot[3] - plot[1])

    for tick in nice_ticks(low, high):
        y = y_of(tick)
        pen.line([(plot[0], y), (plot[2], y)], fill=GRID_COLOR)
        text = _label(tick)
        pen.text((plot[0] - 6 - pen.textlength(text, font=font), y - 7), text, fill=TEXT_COLOR, font=font)
    for tick in nice_ticks(1, x_max, 8):
        if tick < 1 or tick != int(tick):
            continue
        x = x_of(tick)
        pen.line([(x, plot[3]), (x, plot[3] + 4)], fill=AXIS_COLOR)
        text = str(int(tick))
        pen.text((x - pen.textlength(text, font=font) / 2, plot[3] + 6), text, fill=TEXT_COLOR, font=font)
    pen.rectangle(plot, outline=AXIS_COLOR)
    for step, value in finite:
        x, y = x_of(step), y_of(value)
        pen.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=RAW_COLOR)
    line = [(x_of(step), y_of(value)) for step, value in trend]
    if len(line) > 1:
        pen.line(line, fill=TREND_COLOR, width=2)
    elif line:
        x, y = line[0]
        pen.ellipse((x - 2, y - 2, x + 2, y + 2), fill=TREND_COLOR)
    heading = title or "loss"
    if steps:
        heading += f"  step {steps}" + (f"/{total_steps}" if total_steps else "")
        heading += f"  loss {losses[-1]:.4g}"
    if trend:
        heading += f"  smoothed {trend[-1][1]:.4g}"
    pen.text((left, 10), heading, fill=TEXT_COLOR, font=font)
    pen.text(((plot[0] + plot[2]) / 2 - 12, height - 17), "step", fill=AXIS_COLOR, font=font)
    return _save(image, path, {"loraloom.steps": str(steps), "loraloom.total_steps": str(total_steps or "")})


# ---------------------------------------------------------------------------------------- sample grid


@dataclass(frozen=True)
class GridLayout:
    """Where each sample goes in the grid: ``rows`` prompts by ``columns`` sample steps."""

    rows: int
    columns: int
    cell: tuple[int, int]  # (width, height) of one image in the grid

    @property
    def size(self) -> tuple[int, int]:
        return (
            LABEL_WIDTH + self.columns * (self.cell[0] + GAP),
            HEADER_HEIGHT + self.rows * (self.cell[1] + GAP),
        )

    def box(self, row: int, column: int) -> tuple[int, int, int, int]:
        x = LABEL_WIDTH + column * (self.cell[0] + GAP)
        y = HEADER_HEIGHT + row * (self.cell[1] + GAP)
        return (x, y, x + self.cell[0], y + self.cell[1])


def cell_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """A sample's size in the grid: enlarged by a whole factor up to ``MIN_CELL``, or reduced to
    ``MAX_CELL`` (aspect kept)."""
    width, height = image_size
    side = max(width, height)
    if side < MIN_CELL:
        factor = math.ceil(MIN_CELL / side)
        return width * factor, height * factor
    if side > MAX_CELL:
        return max(1, round(width * MAX_CELL / side)), max(1, round(height * MAX_CELL / side))
    return width, height


def sample_steps_in(folder: Path) -> list[int]:
    """The steps that have sample images in ``folder``, in order."""
    if not folder.is_dir():
        return []
    found = {int(m.group(1)) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))}
    return sorted(found)


def _columns(steps: list[int]) -> list[int]:
    if len(steps) <= MAX_COLUMNS:
        return steps
    picks = {round(i * (len(steps) - 1) / (MAX_COLUMNS - 1)) for i in range(MAX_COLUMNS)}
    return [steps[i] for i in sorted(picks)]


def _wrap(pen: ImageDraw.ImageDraw, text: str, font, width: int, lines: int) -> list[str]:
    words, out, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if pen.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            out.append(line)
            line = word
    if line:
        out.append(line)
    if len(out) > lines:
        out = out[:lines]
        while out[-1] and pen.textlength(out[-1] + "…", font=font) > width:
            out[-1] = out[-1][:-1]
        out[-1] += "…"
    return out


def draw_sample_grid(
    folder: Path, prompts: Sequence[str], path: Path, *, up_to_step: int | None = None
) -> Path | None:
    """The grid of the samples in ``folder`` (steps up to ``up_to_step``) into ``path``; ``None``
    when there is nothing to draw yet."""
    steps = [s for s in sample_steps_in(folder) if up_to_step is None or s <= up_to_step]
    steps = _columns(steps)
    if not steps or not prompts:
        return None
    images: dict[tuple[int, int], Image.Image] = {}
    for column, step in enumerate(steps):
        for row, prompt in enumerate(prompts):
            file = sample_path(folder, step, row, prompt)
            if file.is_file():
                with Image.open(file) as opened:
                    images[(row, column)] = opened.convert("RGB")
    if not images:
        return None
    largest = max(images.values(), key=lambda im: im.width * im.height).size
    layout = GridLayout(rows=len(prompts), columns=len(steps), cell=cell_size(largest))
    grid = Image.new("RGB", layout.size, "white")
    pen = ImageDraw.Draw(grid)
    font = _font(12)
    line_height = 15
    for column, step in enumerate(steps):
        x0, _, x1, _ = layout.box(0, column)
        text = f"step {step}"
        pen.text(((x0 + x1 - pen.textlength(text, font=font)) / 2, 5), text, fill=TEXT_COLOR, font=font)
    for row, prompt in enumerate(prompts):
        _, y0, _, y1 = layout.box(row, 0)
        lines = _wrap(pen, prompt, font, LABEL_WIDTH - 12, max(1, (y1 - y0) // line_height))
        y = (y0 + y1) / 2 - len(lines) * line_height / 2
        for line in lines:
            pen.text((6, y), line, fill=TEXT_COLOR, font=font)
            y += line_height
    for (row, column), image in images.items():
        box = layout.box(row, column)
        resample = Image.Resampling.NEAREST if image.width < layout.cell[0] else Image.Resampling.LANCZOS
        grid.paste(image.resize(layout.cell, resample), box[:2])
    info = {"loraloom.sample_steps": ",".join(map(str, steps)), "loraloom.prompts": str(len(prompts))}
    return _save(grid, path, info)
