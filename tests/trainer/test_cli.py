"""``loraloom train`` through the real CLI: TOML + flags, errors, and registration into a running server."""

from __future__ import annotations

import pytest
from imagegen import make_folder
from typer.testing import CliRunner

from adapters.formats import load_adapter
from server.cli.main import app

runner = CliRunner()


def test_toml_config_with_flag_overrides_writes_and_registers(tmp_path, shapes_dir, one_thread):
    config = tmp_path / "run.toml"
    config.write_text(
        f'[train]\ndata_dir = "{shapes_dir}"\nname = "from-toml"\nbase = "micro"\nrank = 4\nsteps = 2\n'
        f'resolution = 16\nbatch_size = 2\nlr = 1e-3\noutput_dir = "{tmp_path / "work"}"\nprogress = false\n'
    )
    out = tmp_path / "adapter.safetensors"
    result = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(config),
            "--steps",
            "3",
            "--out",
            str(out),
            "--store",
            str(tmp_path / "home"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "registered from-toml@1" in result.output
    adapter = load_adapter(out.read_bytes())
    assert adapter.metadata["ss_steps"] == "3" and adapter.metadata["ss_network_dim"] == "4"
    assert adapter.base is not None and adapter.base.architecture == "loraloom:micro"


def test_loraloom_server_is_the_default_only_when_nothing_else_says_where(monkeypatch):
    from trainer.cli import _server_from_environment
    from trainer.config import TrainConfig

    monkeypatch.setenv("LORALOOM_SERVER", "10.0.0.5:50051")
    assert _server_from_environment(TrainConfig(data_dir="x")).server == "10.0.0.5:50051"
    for where in ({"store": "/data"}, {"no_register": True}, {"server": "other:1"}):
        config = TrainConfig(data_dir="x", **where)
        assert _server_from_environment(config) == config


def test_defaults_show_in_the_help():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "(default: 8)" in result.output and "(default: 0.0001)" in result.output
    assert "(default: attn)" in result.output and "LORALOOM_SERVER" in result.output


def test_empty_folder_is_a_clean_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["train", str(empty), "--base", "micro", "--no-register", "--no-progress"])
    assert result.exit_code == 2
    assert "error: no training images in" in result.output and "Traceback" not in result.output


def test_unknown_toml_option_is_a_usage_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('data_dir = "x"\nlearning_rate = 1\n')
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2 and "unknown option(s) learning_rate" in result.output


@pytest.mark.slow
def test_train_with_a_server_registers_and_the_next_generate_uses_it(tmp_path, one_thread):
    from server.api.app import ServerThread
    from server.client import Client
    from server.settings import Settings

    data = make_folder(tmp_path / "shapes", 8, size=(40, 40))
    config = Settings.of(
        host="127.0.0.1",
        port=0,
        model="micro",
        home=tmp_path / "server-home",
        default_steps=4,
        log_level="WARNING",
    )
    with ServerThread(config) as running:
        result = runner.invoke(
            app,
            [
                "train", str(data), "--name", "cli-shapes", "--base", "micro", "--steps", "20",
                "--resolution", "16", "--batch-size", "2", "--lr", "1e-2", "--targets", "attn,conv",
                "--trigger-word", "shp", "--output-dir", str(tmp_path / "work"), "--no-progress",
            ],
            env={"LORALOOM_SERVER": running.address},  # as the client commands find their server
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"registered cli-shapes@1 in {running.address}" in result.output
        with Client(running.address, timeout=120) as client:
            info = client.get_adapter("cli-shapes")
            assert info.trigger_words == ("shp",) and info.training_metadata["steps"] == "20"
            plain = client.generate("red circle", steps=4, seed=7)
            adapted = client.generate("red circle", steps=4, seed=7, adapters=["cli-shapes"])
    assert len(adapted.images) == 1 and adapted.images[0].data
    assert adapted.images[0].data != plain.images[0].data


def test_no_flags_registers_into_the_default_store(shapes_dir, loraloom_home, one_thread):
    result = runner.invoke(
        app,
        ["train", str(shapes_dir), "--base", "micro", "--epochs", "1", "--batch-size", "4",
         "--resolution", "16", "--no-progress"],
        env={"LORALOOM_SERVER": ""},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    database = loraloom_home / "store" / "adapters.sqlite3"
    assert "4 steps" in result.output and f"registered shapes@1 in the store at {database}" in result.output
    from adapters.store import AdapterStore

    with AdapterStore.open() as store:
        version = store.get("shapes")
    assert version.base_architecture == "loraloom:micro"
    assert (loraloom_home / "training" / "shapes" / "shapes.safetensors").is_file()


def test_unreachable_server_keeps_the_trained_file(tmp_path, shapes_dir, one_thread):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = runner.invoke(
        app,
        ["train", str(shapes_dir), "--base", "micro", "--steps", "1", "--resolution", "16", "--no-progress",
         "--output-dir", str(tmp_path / "work"), "--server", f"127.0.0.1:{port}"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    saved = tmp_path / "work" / "shapes.safetensors"
    assert f"the trained adapter is saved at {saved}" in result.output and saved.is_file()
