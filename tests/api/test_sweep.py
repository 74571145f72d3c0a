"""``loraloom sweep`` through a real server (micro model): the grid's layout, its labels, and every
cell equal to a single Generate with the same seed and weights."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from server.cli.main import app
from server.cli.sweep import BACKGROUND, cell_adapters, compose, parse_weights
from tests.api.helpers import adapter_bytes

PROMPT = "a large red circle on a white background"
SEED = 11
WEIGHTS = [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def uploaded(running, micro_shapes):
    from server.client import Client

    with Client(running.address, timeout=60) as client:
        client.upload_adapter(adapter_bytes(micro_shapes, seed=21), "sweep-a")
        client.upload_adapter(adapter_bytes(micro_shapes, seed=22), "sweep-b")
    return running


def _single(address: str, blend: list[str]) -> np.ndarray:
    from server.client import Client

    with Client(address, timeout=60) as client:
        result = client.generate(PROMPT, adapters=blend, seed=SEED)
    return np.asarray(Image.open(BytesIO(result.images[0].data)).convert("RGB"))


def _run(uploaded, tmp_path, *adapters: str):
    path = tmp_path / "grid.png"
    argv = ["sweep", PROMPT, "--weights", ",".join(f"{w:g}" for w in WEIGHTS), "--seed", str(SEED)]
    for name in adapters:
        argv += ["--adapter", name]
    result = CliRunner().invoke(app, [*argv, "--server", uploaded.address, "-o", str(path)])
    assert result.exit_code == 0, result.output
    assert f"seed {SEED}" in result.output
    return np.asarray(Image.open(path).convert("RGB"))


def _layout(rows: int, columns: int, cell: int, row_title: str | None):
    """The margins compose() leaves for these labels (its layout does not depend on the pixels)."""
    blank = [[Image.new("RGB", (cell, cell))] * columns for _ in range(rows)]
    if row_title is None:
        return compose(blank, "sweep-a", WEIGHTS)
    return compose(blank, "sweep-b", WEIGHTS, row_title, WEIGHTS)


def _has_ink(region: np.ndarray) -> bool:
    return bool((region != np.array(BACKGROUND, dtype=np.uint8)).any(axis=-1).sum() > 20)


@pytest.mark.slow
def test_two_adapters_make_a_labelled_grid_of_single_generates(uploaded, tmp_path):
    grid = _run(uploaded, tmp_path, "sweep-a", "sweep-b")
    cell = _single(uploaded.address, [])
    size = cell.shape[0]
    layout = _layout(len(WEIGHTS), len(WEIGHTS), size, "sweep-a")
    assert layout.left > 0 and layout.top > 0
    assert grid.shape == (layout.top + len(WEIGHTS) * size, layout.left + len(WEIGHTS) * size, 3)
    # Labels: the top margin (axis title and column weights) and the left one (title and row weights).
    assert _has_ink(grid[: layout.top // 2, layout.left :])
    assert _has_ink(grid[layout.top // 2 : layout.top, layout.left :])
    assert _has_ink(grid[layout.top :, : layout.left])
    seen = set()
    for row, weight_a in enumerate(WEIGHTS):
        for column, weight_b in enumerate(WEIGHTS):
            blend = cell_adapters(["sweep-a", "sweep-b"], [weight_a, weight_b])
            x0, y0, x1, y1 = layout.cell_box(row, column)
            assert np.array_equal(grid[y0:y1, x0:x1], _single(uploaded.address, blend)), (weight_a, weight_b)
            seen.add(grid[y0:y1, x0:x1].tobytes())
    assert len(seen) == len(WEIGHTS) ** 2  # the weights change the image: not one picture repeated


def test_one_adapter_makes_a_single_row(uploaded, tmp_path):
    grid = _run(uploaded, tmp_path, "sweep-a")
    size = _single(uploaded.address, []).shape[0]
    layout = _layout(1, len(WEIGHTS), size, None)
    assert layout.left == 0
    assert grid.shape == (layout.top + size, len(WEIGHTS) * size, 3)
    assert _has_ink(grid[: layout.top])
    for column, weight in enumerate(WEIGHTS):
        x0, y0, x1, y1 = layout.cell_box(0, column)
        expected = _single(uploaded.address, cell_adapters(["sweep-a"], [weight]))
        assert np.array_equal(grid[y0:y1, x0:x1], expected), weight


def test_weight_zero_leaves_the_adapter_out_and_bad_input_is_refused():
    assert cell_adapters(["a", "b"], [0.0, 0.25]) == ["b:0.25"]
    assert cell_adapters(["a", "b"], [0.0, 0.0]) == []
    assert parse_weights("0, 0.25,1") == [0.0, 0.25, 1.0]
    runner = CliRunner()
    for argv, message in (
        (["-a", "x", "-a", "y", "-a", "z"], "once or twice"),
        (["-a", "x:0.5"], "without a weight"),
        (["-a", "x", "-a", "x"], "the same"),
        (["-a", "x", "--weights", "0,heavy"], "numbers"),
        (["-a", "x", "--weights", "0,0"], "repeated"),
    ):
        result = runner.invoke(app, ["sweep", "p", *argv, "--server", "127.0.0.1:1"])
        assert result.exit_code == 2 and message in result.output, (argv, result.output)
