"""TrainConfig: TOML files, flag overrides, checks with messages that name the option."""

from __future__ import annotations

import pytest
import torch

from adapters.errors import InvalidArgument
from trainer.config import TrainConfig


def test_toml_with_train_table_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[train]\ndata_dir = "imgs"\nbase = "micro"\nrank = 4\nalpha = 2\nlr-scheduler = "cosine"\n'
        'targets = ["attn", "to_out.0", "conv"]\nvalidation_prompts = ["a red circle"]\nsteps = 10\n'
    )
    config = TrainConfig.from_toml(path, steps=20, name=None)
    assert (config.data_dir, config.base, config.rank, config.alpha) == ("imgs", "micro", 4, 2.0)
    assert config.lr_scheduler == "cosine" and config.steps == 20  # the override wins, None is ignored
    assert config.unet_target_modules() == [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "conv1",
        "conv2",
        "conv_shortcut",
    ]
    assert config.adapter_name == "imgs"


def test_flat_toml_is_accepted(tmp_path):
    path = tmp_path / "flat.toml"
    path.write_text('data_dir = "x"\nepochs = 3\n')
    assert TrainConfig.from_toml(path).epochs == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('data_dir = "x"\nrnak = 4\n', "unknown option.*rnak"),
        ('data_dir = "x"\nrank = "four"\n', "rank must be an integer"),
        ('data_dir = "x"\nlr_scheduler = "step"\n', "lr_scheduler must be one of constant, cosine, linear"),
        ('data_dir = "x"\nsteps = 5\nepochs = 1\n', "steps or epochs, not both"),
        ('data_dir = "x"\ncaption_dropout = 1.5\n', "caption_dropout must be between 0 and 1"),
        ("rank = 4\n", "data_dir is required"),
        ('data_dir = "x"\nstore = "a"\nserver = "h:1"\n', "--store or --server, not both"),
        ("data_dir = [", "not valid TOML"),
    ],
)
def test_bad_config_is_refused_naming_the_option(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=message):
        TrainConfig.from_toml(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(InvalidArgument, match="cannot read config file"):
        TrainConfig.from_toml(tmp_path / "absent.toml")


def test_every_option_has_help():
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainConfig))


def test_device_names():
    from adapters.errors import FailedPrecondition
    from trainer.loop import pick_device

    assert pick_device("cpu").type == "cpu"
    with pytest.raises(InvalidArgument, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(FailedPrecondition, match="no CUDA device"):
            pick_device("cuda")


def test_default_base_follows_the_servers_variable(monkeypatch):
    monkeypatch.delenv("LORALOOM_MODEL", raising=False)
    assert TrainConfig(data_dir="x").base == "toy"
    monkeypatch.setenv("LORALOOM_MODEL", "micro")
    assert TrainConfig(data_dir="x").base == "micro"
    assert TrainConfig(data_dir="x", base="small").base == "small"
