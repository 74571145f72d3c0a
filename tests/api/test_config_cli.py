"""Server configuration (defaults, LORALOOM_* variables, flags) and the CLI's help and argument handling."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.cli.main import app
from server.settings import FIELDS, SECRET_FIELDS, Settings


def test_defaults_serve_the_builtin_model_on_localhost():
    settings = Settings.load({})
    assert (settings.api.host, settings.api.port) == ("127.0.0.1", 50051)
    assert (settings.model.model, settings.model.device) == ("toy", "cpu")
    assert settings.store.home is None and settings.store.store_db_url is None and settings.engine.warmup


def test_environment_then_flags():
    environ = {
        "LORALOOM_PORT": "6000",
        "LORALOOM_MODEL": "micro",
        "LORALOOM_WARMUP": "false",
        "LORALOOM_GRACE_S": "2.5",
        "LORALOOM_HOME": "/tmp/somewhere",
        "LORALOOM_STORE_DB_URL": "sqlite:////tmp/x.sqlite3",
    }
    settings = Settings.load(environ, port=7000, host=None)
    assert (settings.api.port, settings.model.model) == (7000, "micro")
    assert (settings.engine.warmup, settings.api.grace_s) == (False, 2.5)
    assert settings.store.home == Path("/tmp/somewhere") and settings.store.store_db_url.endswith("x.sqlite3")
    assert settings.api.host == "127.0.0.1"


def test_a_bad_variable_names_itself():
    with pytest.raises(ValueError, match="LORALOOM_MAX_QUEUE='lots'"):
        Settings.load({"LORALOOM_MAX_QUEUE": "lots"})


def test_one_default_per_setting_everywhere():
    """The engine, scheduler and store take their defaults from the settings (they used to disagree)."""
    from server.engine.engine import DEFAULT_CACHE_BYTES
    from server.engine.scheduler import Scheduler
    from server.engine.types import Limits

    settings = Settings()
    assert settings.engine.cache_bytes == DEFAULT_CACHE_BYTES
    assert Limits() == settings.limits and Limits().max_images == 4
    defaults = inspect.signature(Scheduler).parameters
    assert defaults["max_queue"].default == settings.scheduler.max_queue == 32
    assert defaults["max_batch"].default == settings.scheduler.max_batch


def test_every_setting_but_the_secrets_is_a_serve_flag():
    (serve,) = [c.callback for c in app.registered_commands if c.callback.__name__ == "serve"]
    flags = set(inspect.signature(serve).parameters)
    assert flags == set(FIELDS) - SECRET_FIELDS


def test_limits_derived_from_the_settings():
    settings = Settings.of(max_message_mb=4)
    assert settings.api.max_message_bytes == 4 << 20
    assert settings.api.chunk_bytes == (4 << 20) - 64 * 1024
    assert Settings.of(image_chunk_bytes=700).api.chunk_bytes == 700
    assert "model=toy" in settings.summary()
    with pytest.raises(TypeError, match="unknown settings: nope"):
        Settings.of(nope=1)


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["generate"],
        ["sweep"],
        ["info"],
        ["adapters"],
        ["adapters", "list"],
        ["adapters", "show"],
        ["adapters", "upload"],
        ["adapters", "delete"],
        ["adapters", "alias"],
        ["adapters", "load"],
        ["adapters", "unload"],
        ["adapters", "resident"],
    ],
)
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output) > 200


def test_serve_help_names_the_environment_variables():
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert "LORALOOM_PORT" in result.output and "LORALOOM_MODEL" in result.output


def test_bad_adapter_spec_is_refused_before_any_call():
    result = CliRunner().invoke(app, ["generate", "x", "--adapter", "style:heavy", "--server", "127.0.0.1:1"])
    assert result.exit_code == 1
    assert "bad adapter weight" in result.output


def test_train_hands_over_to_the_trainer_or_says_it_is_missing():
    import importlib.util

    result = CliRunner().invoke(app, ["train", "--help"])
    if importlib.util.find_spec("trainer.cli") is None:
        assert result.exit_code == 2 and "trainer" in result.output
    else:
        assert result.exit_code == 0 and "Usage" in result.output


def test_adapters_list_table_keeps_refs_whole_at_80_columns():
    from types import SimpleNamespace

    from rich.console import Console

    from server.cli.output import adapter_table

    rows = [
        SimpleNamespace(
            ref=f"{name}@{version}",
            aliases=("prod", "stable"),
            architecture="loraloom:toy",
            rank=8,
            format="kohya",
            size_bytes=334_420,
            sha256="ab" * 32,
            created_at=1.79e9,
        )
        for name, version in (("watercolor-portrait-v2", 13), ("striped", 2))
    ]
    for width in (80, 140):
        console = Console(width=width, record=True)
        console.print(adapter_table(rows, width))
        text = console.export_text()
        assert "watercolor-portrait-v2@13" in text and "prod,stable" in text and "…" not in text
        assert max(len(line) for line in text.splitlines()) <= width
        assert ("abababababab" in text) is (width >= 120)  # the sha256 column only when it fits


def test_generate_help_names_every_sampler():
    from server.engine.samplers import sampler_names

    text = " ".join(CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "300"}).output.split())
    assert all(name in text for name in sampler_names()), text
    assert "[default: 0]" not in text


def test_adapters_show_says_how_an_adapter_was_trained():
    from types import SimpleNamespace

    from server.cli.main import _describe

    item = SimpleNamespace(
        ref="mystripes@1",
        sha256="ab" * 32,
        size_bytes=334_420,
        architecture="loraloom:toy",
        base_fingerprint="9cf3cd70a29746d2",
        rank=8,
        format="canonical",
        components=("unet",),
        aliases=(),
        tags=(),
        trigger_words=(),
        description="",
        created_at=1.79e9,
        training_metadata={"steps": "360", "images": "512", "seconds": "104.2", "base_model": "toy"},
        metadata={"loraloom.adapter_type": "LoCon"},
    )
    assert "trained       360 steps, 512 images, 104 s, on toy" in _describe(item)
    assert "format        LoCon (canonical file)" in _describe(item)
    assert "trained" not in _describe(SimpleNamespace(**{**vars(item), "training_metadata": {}}))


def test_adapters_show_says_what_a_file_is_and_what_made_it():
    """Versions stored before the server recorded the type: told from kohya's ss_network_* keys."""
    from types import SimpleNamespace

    from server.cli.main import _describe

    def shown(metadata: dict) -> dict[str, str]:
        item = SimpleNamespace(
            ref="x@1",
            sha256="ab" * 32,
            size_bytes=1,
            architecture="sd_v1",
            base_fingerprint="",
            rank=16,
            format="kohya",
            components=("unet",),
            aliases=(),
            tags=(),
            trigger_words=(),
            description="",
            created_at=0.0,
            training_metadata={},
            metadata=metadata,
        )
        return {line[:14].strip(): line[14:] for line in _describe(item).splitlines()}  # "key<14>value"

    lycoris = {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr", "dora_wd": "True"}'}
    rows = shown(lycoris)
    assert (rows["format"], rows["rank"]) == ("DoRA (LoKr) (kohya file)", "16")
    assert rows["made by"] == "lycoris.kohya (algo=lokr, dora_wd=True)"
    assert shown({"ss_network_module": "networks.lora"})["format"] == "LoRA (kohya file)"
    full = shown({"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "full"}'})
    assert (full["format"], full["rank"]) == ("diff (kohya file)", "full")
    assert shown({})["format"] == "LoRA (kohya file)" and "made by" not in shown({})
