"""The built wheel (what the Docker images install) carries every runtime data file and serves ``toy``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("adapters", "server", "trainer")
PROJECT_FILES = ("pyproject.toml", "README.md", "constraints.txt")


def runtime_data_files() -> set[str]:
    """Non-Python files git tracks inside the packages (weights, tokenizer data, type stubs)."""
    listed = subprocess.run(
        ["git", "ls-files", *PACKAGES], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if listed.returncode == 0 and listed.stdout.strip():
        tracked = listed.stdout.split()
    else:  # not a git checkout (an sdist): every file below the packages
        tracked = [
            path.relative_to(ROOT).as_posix()
            for package in PACKAGES
            for path in (ROOT / package).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        ]
    return {name for name in tracked if not name.endswith((".py", ".pyc"))}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the checkout's own build/ stays untouched)."""
    source = tmp_path_factory.mktemp("source")
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "-q", "-w", str(out)], check=True, timeout=300)
    (built,) = out.glob("loraloom-*.whl")
    return built


def test_the_wheel_holds_every_runtime_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = runtime_data_files()
    assert "server/models/data/toy/unet/diffusion_pytorch_model.safetensors" in expected
    assert sorted(expected - names) == []


@pytest.mark.slow
def test_an_installed_wheel_loads_the_default_model_and_its_examples(wheel, tmp_path):
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, timeout=300)
    code = (
        "import server.models.loader as loader\n"
        "from server.models.toy.measures import CLASSIFIER_FILE\n"
        "from server.models.toy.styles import SHIPPED, shipped_adapter\n"
        f"assert loader.__file__.startswith({str(target)!r}), loader.__file__\n"
        "model = loader.load_base_model('toy')\n"
        "assert model.resolution == 64 and CLASSIFIER_FILE.is_file()\n"
        "assert all(shipped_adapter(style).is_file() for style in SHIPPED)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    # Run outside the checkout so nothing is imported from the source tree.
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, timeout=300)
