"""What a person looks at: the loss curve and the sample grid (PNG files), and the progress bar."""

from __future__ import annotations

import pytest
from PIL import Image

from trainer import TrainConfig, train
from trainer.plots import (
    CURVE_SIZE,
    LOSS_CURVE,
    MAX_COLUMNS,
    SAMPLE_GRID,
    GridLayout,
    cell_size,
    draw_loss_curve,
    draw_sample_grid,
    nice_ticks,
    smoothed,
)
from trainer.progress import RunClock, format_duration, format_rate
from trainer.samples import sample_path

PROMPTS = ["red circle", "a blue square on a white background, drawn with a very long prompt indeed"]


def png(path) -> Image.Image:
    """The file as a PNG, checked whole (``verify``), then opened again to read."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    image = Image.open(path)
    image.load()
    return image


def colour(step: int, row: int) -> tuple[int, int, int]:
    return (step * 20 % 256, 60 + row * 90, 200 - step * 10 % 200)


def write_samples(folder, steps, prompts, size=(16, 16)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for step in steps:
        for row, prompt in enumerate(prompts):
            image = Image.new("RGB", size, colour(step, row))
            image.putpixel((0, 0), (255, 255, 255))  # a corner marker: orientation survives the grid
            image.save(sample_path(folder, step, row, prompt))


def test_the_loss_curve_is_a_png_of_its_steps(tmp_path):
    path = draw_loss_curve([1.0 / (1 + i / 10) for i in range(120)], tmp_path / LOSS_CURVE, total_steps=200)
    image = png(path)
    assert image.size == CURVE_SIZE and image.text["loraloom.steps"] == "120"
    assert image.text["loraloom.total_steps"] == "200"
    assert len(image.getcolors(1 << 16)) > 3  # axes, dots, trend line, text: not a blank canvas
    # One step, a NaN and no steps at all draw too (the first point of a run, a diverged step).
    assert png(draw_loss_curve([0.5], tmp_path / "one.png")).text["loraloom.steps"] == "1"
    assert png(draw_loss_curve([0.5, float("nan"), 0.4], tmp_path / "nan.png")).size == CURVE_SIZE
    assert png(draw_loss_curve([], tmp_path / "none.png", total_steps=10)).text["loraloom.steps"] == "0"
    assert not list(tmp_path.glob(".*partial*"))  # written atomically, nothing left behind


def test_smoothing_and_ticks():
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected from step 1
    trend = smoothed([1.0] * 10 + [0.0] * 10, beta=0.5)
    assert trend[9] == pytest.approx(1.0) and 0 < trend[10] < 1 and trend[-1] < 0.01
    assert nice_ticks(0.83, 1.37) == pytest.approx([0.9, 1.0, 1.1, 1.2, 1.3])
    assert nice_ticks(1, 1000, 8) == pytest.approx([100 * i for i in range(1, 11)])


def test_the_sample_grid_is_prompts_by_sample_steps(tmp_path):
    folder = tmp_path / "samples"
    steps = [10, 20, 30]
    write_samples(folder, steps, PROMPTS)
    image = png(draw_sample_grid(folder, PROMPTS, tmp_path / SAMPLE_GRID))
    layout = GridLayout(rows=len(PROMPTS), columns=len(steps), cell=cell_size((16, 16)))
    assert layout.cell == (128, 128)  # 16 px enlarged 8x (a whole factor: pixels stay sharp)
    assert image.size == layout.size == (180 + 3 * 132, 24 + 2 * 132)
    assert image.text["loraloom.sample_steps"] == "10,20,30" and image.text["loraloom.prompts"] == "2"
    for row in range(len(PROMPTS)):
        for column, step in enumerate(steps):
            cell = image.crop(layout.box(row, column)).convert("RGB")
            source = Image.open(sample_path(folder, step, row, PROMPTS[row])).convert("RGB")
            assert cell.tobytes() == source.resize(layout.cell, Image.Resampling.NEAREST).tobytes()
    # Up to a step, and with a missing sample (a blank cell) and more prompts than were sampled.
    (sample_path(folder, 20, 1, PROMPTS[1])).unlink()
    image = png(draw_sample_grid(folder, [*PROMPTS, "green"], tmp_path / "g.png", up_to_step=20))
    layout = GridLayout(rows=3, columns=2, cell=(128, 128))
    assert image.size == layout.size and image.text["loraloom.sample_steps"] == "10,20"
    assert image.crop(layout.box(1, 1)).getcolors() == [(128 * 128, (255, 255, 255))]
    assert draw_sample_grid(tmp_path / "nothing", PROMPTS, tmp_path / "x.png") is None


def test_large_samples_shrink_and_many_steps_are_thinned(tmp_path):
    folder = tmp_path / "samples"
    steps = list(range(1, 41))
    write_samples(folder, steps, PROMPTS[:1], size=(512, 384))
    image = png(draw_sample_grid(folder, PROMPTS[:1], tmp_path / SAMPLE_GRID))
    shown = [int(s) for s in image.text["loraloom.sample_steps"].split(",")]
    assert len(shown) == MAX_COLUMNS and shown[0] == 1 and shown[-1] == 40
    assert image.size == GridLayout(rows=1, columns=MAX_COLUMNS, cell=(256, 192)).size


def test_rate_and_eta_leave_sampling_and_checkpoints_out_of_the_step_rate():
    clock = RunClock(10, events={"sample": {5, 10}, "checkpoint": lambda s: s % 5 == 0})
    assert clock.steps_per_second is None and clock.eta(0) is None
    for _ in range(4):
        clock.step_took(0.5)
    clock.side_took("sample", 3.0)  # slow, but not a slow step
    assert clock.steps_per_second == pytest.approx(2.0)
    # 6 steps at 2/s, then the samples at 5 and 10 (3 s each); checkpoints not timed yet: 0.
    assert clock.eta(4) == pytest.approx(3.0 + 6.0)
    clock.side_took("checkpoint", 1.0)
    assert clock.eta(5) == pytest.approx(2.5 + 3.0 + 1.0)  # only step 10's left
    assert clock.eta(10) == 0
    assert format_rate(2.5) == "2.50 steps/s" and format_rate(0.25) == "4.00 s/step"
    assert format_duration(75) == "01:15" and format_duration(3 * 3600 + 61) == "3:01:01"


@pytest.mark.slow
def test_training_draws_and_redraws_them_next_to_the_checkpoints(tmp_path, shapes_dir, one_thread, capsys):
    """Steps 1-4, checkpoints at 2 and 4, samples at 2 and 4 (the last step): the curve and the grid
    are drawn at 2 and redrawn at 4; the bar shows steps/s and the ETA."""
    seen = {}

    def look(info) -> None:
        curve, grid = png(tmp_path / "out" / LOSS_CURVE), None
        if (tmp_path / "out" / SAMPLE_GRID).exists():
            grid = png(tmp_path / "out" / SAMPLE_GRID)
        seen[info.step] = (curve.text["loraloom.steps"], grid and grid.text["loraloom.sample_steps"], info)

    config = TrainConfig(
        data_dir=str(shapes_dir), base="micro", steps=4, batch_size=2, resolution=16, lr=1e-3, seed=1,
        checkpoint_every=2, validation_prompts=PROMPTS, sample_steps=[2], sample_inference_steps=1,
        output_dir=str(tmp_path / "out"), no_register=True, progress=True,
    )  # fmt: skip
    (tmp_path / "out").mkdir()
    draw_loss_curve([], tmp_path / "out" / LOSS_CURVE)  # so that step 1 can look too
    result = train(config, on_step=look)
    assert [seen[s][:2] for s in (1, 2, 3, 4)] == [("0", None), ("2", "2"), ("2", "2"), ("4", "2,4")]
    assert result.loss_curve == tmp_path / "out" / LOSS_CURVE
    assert result.sample_grid == tmp_path / "out" / SAMPLE_GRID
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "checkpoint-0000002", "checkpoint-0000004", LOSS_CURVE, SAMPLE_GRID, "samples"
    }  # fmt: skip
    grid = png(result.sample_grid)
    assert grid.size == GridLayout(rows=2, columns=2, cell=cell_size((16, 16))).size
    infos = [seen[s][2] for s in (1, 2, 3, 4)]
    assert all(i.steps_per_second and i.steps_per_second > 0 for i in infos)
    assert infos[-1].eta_seconds == 0 and infos[0].eta_seconds > 0
    bar = capsys.readouterr().err
    assert ("steps/s" in bar or "s/step" in bar) and "ETA " in bar and "loss=" in bar
