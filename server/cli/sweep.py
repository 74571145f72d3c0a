"""``loraloom sweep``: one labelled PNG grid of a prompt under a range of adapter weights.

Like A1111's X/Y plot: with two adapters, rows are the first adapter's weights
and columns the second's; with one, a single row of its weights. Every cell is
one ``Generate`` through the server with the same seed (and steps, guidance,
sampler), its blend the ``name:weight`` of each adapter whose weight is not 0.
Labels (the adapter names as axis titles, the weights) are drawn with Pillow's
default font in margins above and left of the cells. A client command: it
imports no torch.
"""

# No ``from __future__ import annotations``: typer reads the command's annotations, which name
# options of server.cli.main imported inside register().
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from adapters.errors import LoraloomError

if TYPE_CHECKING:
    from PIL import Image

    from server.client import Client

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
PAD = 4  # pixels around each label
MAX_CELLS = 100


def parse_weights(text: str) -> list[float]:
    """``"0,0.25,0.5"`` -> ``[0.0, 0.25, 0.5]``; finite numbers, at least one, no repeats."""
    try:
        weights = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"not a comma-separated list of numbers: {text!r}") from None
    if not weights:
        raise typer.BadParameter("give at least one weight, e.g. 0,0.5,1")
    if not all(math.isfinite(weight) for weight in weights):
        raise typer.BadParameter(f"weights must be finite numbers: {text!r}")
    if len(set(weights)) != len(weights):
        raise typer.BadParameter(f"a weight is repeated: {text!r}")
    return weights


def cell_adapters(names: Sequence[str], weights: Sequence[float]) -> list[str]:
    """The blend of one cell as ``name:weight`` strings; adapters of weight 0 are left out."""
    return [f"{name}:{weight:g}" for name, weight in zip(names, weights, strict=True) if weight != 0]


def _label(weight: float) -> str:
    return f"{weight:g}"


@dataclass(frozen=True)
class Grid:
    """The composed sheet and where its cells are: cell ``(row, column)`` starts at
    ``(left + column * cell_width, top + row * cell_height)``."""

    image: "Image.Image"
    rows: int
    columns: int
    cell_width: int
    cell_height: int
    left: int  # width of the label margin left of the cells
    top: int  # height of the label margin above the cells

    def cell_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        x = self.left + column * self.cell_width
        y = self.top + row * self.cell_height
        return (x, y, x + self.cell_width, y + self.cell_height)


def _text_size(draw, text: str, font) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def compose(
    cells: "Sequence[Sequence[Image.Image]]",
    column_title: str,
    column_weights: Sequence[float],
    row_title: str | None = None,
    row_weights: Sequence[float] | None = None,
) -> "Grid":
    """Tile ``cells`` (rows of equally sized images) under a labelled top margin (and a left one
    when there are row labels): the column axis title, then each column's weight; the row axis
    title turned on its side, then each row's weight."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    width, height = cells[0][0].size
    rows, columns = len(cells), len(cells[0])
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = max(_text_size(probe, text, font)[1] for text in ("0.25", "Ag", column_title)) + 2 * PAD
    top = 2 * line
    left = 0
    if row_title is not None and row_weights is not None:
        label_width = max(_text_size(probe, _label(w), font)[0] for w in row_weights) + 2 * PAD
        left = line + label_width
    sheet = Image.new("RGB", (left + columns * width, top + rows * height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    grid = Grid(sheet, rows, columns, width, height, left, top)

    def centered(text: str, x0: int, x1: int, y0: int) -> None:
        text_width, text_height = _text_size(draw, text, font)
        bbox = draw.textbbox((0, 0), text, font=font)
        x = x0 + max(0, (x1 - x0 - text_width) // 2) - bbox[0]
        y = y0 + (line - text_height) // 2 - bbox[1]
        draw.text((x, y), text, fill=INK, font=font)

    centered(column_title, left, sheet.width, 0)
    for column, weight in enumerate(column_weights):
        x0, _, x1, _ = grid.cell_box(0, column)
        centered(_label(weight), x0, x1, line)
    if left:
        for row, weight in enumerate(row_weights):
            _, y0, _, y1 = grid.cell_box(row, 0)
            text_width, text_height = _text_size(draw, _label(weight), font)
            bbox = draw.textbbox((0, 0), _label(weight), font=font)
            x = left - PAD - text_width - bbox[0]
            draw.text((x, y0 + (y1 - y0 - text_height) // 2 - bbox[1]), _label(weight), fill=INK, font=font)
        # The row axis title, drawn on its own strip and turned to read bottom to top.
        text_width, text_height = _text_size(draw, row_title, font)
        strip = Image.new("RGB", (text_width + 2 * PAD, line), BACKGROUND)
        strip_draw = ImageDraw.Draw(strip)
        bbox = strip_draw.textbbox((0, 0), row_title, font=font)
        strip_draw.text((PAD - bbox[0], (line - text_height) // 2 - bbox[1]), row_title, fill=INK, font=font)
        turned = strip.rotate(90, expand=True)
        span = rows * height
        sheet.paste(turned, (0, top + max(0, (span - turned.height) // 2)))
    for row, images in enumerate(cells):
        for column, image in enumerate(images):
            if image.size != (width, height):
                raise ValueError(f"cell ({row}, {column}) is {image.size}, not {(width, height)}")
            sheet.paste(image.convert("RGB"), grid.cell_box(row, column)[:2])
    return grid


@dataclass(frozen=True)
class Sweep:
    grid: Grid
    seed: int
    cells: list[list[list[str]]]  # the blend of each cell, as sent


def sweep(
    client: "Client",
    prompt: str,
    adapters: Sequence[str],
    weights: Sequence[float],
    *,
    seed: int,
    scale: int = 1,
    on_cell: Callable[[int, int, list[str]], None] | None = None,
    **options,
) -> "Sweep":
    """Generate every cell through ``client`` (one ``Generate`` each, the same ``seed``) and compose them.

    ``options`` go to every ``client.generate`` (steps, guidance_scale, sampler, negative_prompt,
    width, height). ``scale`` enlarges each cell (nearest neighbour) before composing.
    """
    from io import BytesIO

    from PIL import Image

    if not 1 <= len(adapters) <= 2:
        raise ValueError("sweep takes one or two adapters")
    names = list(adapters)
    row_weights = list(weights) if len(names) == 2 else [None]
    blends: list[list[list[str]]] = []
    cells: list[list[Image.Image]] = []
    for row_weight in row_weights:
        blends.append([])
        cells.append([])
        for column_weight in weights:
            pair = [column_weight] if row_weight is None else [row_weight, column_weight]
            blend = cell_adapters(names, pair)
            if on_cell is not None:
                on_cell(len(blends) - 1, len(cells[-1]), blend)
            result = client.generate(prompt, adapters=blend, seed=seed, num_images=1, **options)
            image = Image.open(BytesIO(result.images[0].data)).convert("RGB")
            if scale != 1:
                image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
            blends[-1].append(blend)
            cells[-1].append(image)
    if len(names) == 2:
        grid = compose(cells, names[1], weights, names[0], weights)
    else:
        grid = compose(cells, names[0], weights)
    return Sweep(grid=grid, seed=seed, cells=blends)


def register(app: typer.Typer) -> None:
    from server.cli.main import DEFAULT_SERVER, Server, Timeout

    @app.command(name="sweep")
    def sweep_command(
        prompt: Annotated[str, typer.Argument(help="What to draw in every cell.")],
        adapter: Annotated[
            list[str],
            typer.Option(
                "--adapter",
                "-a",
                help="An adapter to sweep (name or name@version); once for a row, twice for a grid "
                "(rows: the first adapter's weights, columns: the second's).",
            ),
        ],
        weights: Annotated[
            str, typer.Option("--weights", "-w", help="Comma-separated weights of each axis.")
        ] = "0,0.25,0.5,0.75,1",
        seed: Annotated[
            int | None, typer.Option(help="Seed of every cell (default: random; printed).")
        ] = None,
        steps: Annotated[
            int, typer.Option(help="Denoising steps (0: the server's default).", show_default=False)
        ] = 0,
        guidance: Annotated[
            float | None, typer.Option(help="Guidance scale (default: the server's).")
        ] = None,
        sampler: Annotated[
            str, typer.Option(help="Sampler (default: the model's own).", show_default=False)
        ] = "",
        negative: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
        scale: Annotated[
            int, typer.Option(min=1, max=16, help="Enlarge each cell this many times (nearest neighbour).")
        ] = 1,
        output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.")] = Path(
            "sweep.png"
        ),
        server: Server = DEFAULT_SERVER,
        timeout: Timeout = 600.0,
    ) -> None:
        """Draw one prompt under a range of weights of one or two adapters, as one labelled PNG grid
        (A1111's X/Y plot): the same seed in every cell, adapters of weight 0 left out."""
        from server.cli import output as out
        from server.client import Client

        if not 1 <= len(adapter) <= 2:
            raise typer.BadParameter("give --adapter once or twice", param_hint="--adapter")
        for ref in adapter:
            if ":" in ref:
                raise typer.BadParameter(
                    f"{ref!r}: give the adapter without a weight; --weights sets them", param_hint="--adapter"
                )
        if len(set(adapter)) != len(adapter):
            raise typer.BadParameter("the two adapters are the same", param_hint="--adapter")
        grid_weights = parse_weights(weights)
        count = len(grid_weights) ** len(adapter)
        if count > MAX_CELLS:
            raise typer.BadParameter(f"{count} cells; at most {MAX_CELLS}", param_hint="--weights")
        seed = random.randrange(2**31) if seed is None else seed

        def report(row: int, column: int, blend: list[str]) -> None:
            done = row * len(grid_weights) + column + 1
            typer.echo(f"cell {done}/{count}: {' '.join(blend) or '(no adapter)'}", err=True)

        try:
            with Client(server, timeout=timeout) as client:
                result = sweep(
                    client,
                    prompt,
                    adapter,
                    grid_weights,
                    seed=seed,
                    scale=scale,
                    on_cell=report,
                    steps=steps,
                    guidance_scale=guidance,
                    sampler=sampler,
                    negative_prompt=negative,
                )
        except LoraloomError as error:
            raise out.fail(error, server) from None
        output.parent.mkdir(parents=True, exist_ok=True)
        result.grid.image.save(output, optimize=True)
        size = result.grid.image.size
        typer.echo(f"wrote {output} ({size[0]}x{size[1]}, {count} cells, seed {seed})")
