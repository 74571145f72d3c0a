"""LR schedules with warm-up, and seeded runs that reproduce byte for byte (micro model, 8 px)."""

from __future__ import annotations

import math

import pytest

from trainer import TrainConfig, train


def quick_config(data_dir, work, **overrides) -> TrainConfig:
    options = dict(
        data_dir=str(data_dir), base="micro", resolution=8, batch_size=2, steps=6, lr=1e-3,
        output_dir=str(work), no_register=True, progress=False,
    )  # fmt: skip
    options.update(overrides)
    return TrainConfig(**options)


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        ("constant", [0.5, 1, 1, 1, 1, 1]),
        ("linear", [0.5, 1, 0.75, 0.5, 0.25, 0]),
        ("cosine", [0.5, 1, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0]),
    ],
)
def test_schedules_warm_up_then_follow_their_shape(tmp_path, shapes_dir, one_thread, scheduler, expected):
    rates: list[float] = []
    config = quick_config(shapes_dir, tmp_path, lr_scheduler=scheduler, warmup_steps=2)
    train(config, on_step=lambda info: rates.append(info.lr))
    # info.lr is the rate for the next step: warm-up 1/2, 2/2, then the schedule over the remaining 4.
    assert rates == pytest.approx([1e-3 * x for x in expected], abs=1e-9)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, shapes_dir, one_thread):
    first = train(quick_config(shapes_dir, tmp_path / "a", seed=5, caption_dropout=0.5, shuffle_tags=True))
    again = train(quick_config(shapes_dir, tmp_path / "b", seed=5, caption_dropout=0.5, shuffle_tags=True))
    other = train(quick_config(shapes_dir, tmp_path / "c", seed=6, caption_dropout=0.5, shuffle_tags=True))
    assert first.sha256 == again.sha256 and first.losses == again.losses
    assert other.sha256 != first.sha256
