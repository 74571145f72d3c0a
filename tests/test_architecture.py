"""The architecture rules: the import-linter contracts of ``[tool.importlinter]`` in pyproject.toml.

``lint-imports`` (the venv's, next to ``sys.executable``) checks them on the repository; a second
test breaks two contracts in a copy of the packages and checks that ``lint-imports`` says so, so a
contract that can never fail (a misspelt module, a lost wildcard) does not pass unnoticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.architecture

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adapters", "server", "trainer")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def contract_name(source_module: str) -> str:
    """The name of the forbidden contract whose only source module is ``source_module``."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (name,) = (c["name"] for c in config["contracts"] if c["source_modules"] == [source_module])
    return name


def lint_imports(cwd: Path, **env: str) -> tuple[int, str, str]:
    """Run ``lint-imports`` in ``cwd``: its exit status, its output and the output on one line."""
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the test extra (import-linter)")
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],  # reads the pyproject.toml in cwd
        cwd=cwd,
        # A wide console, so that rich wraps no contract name; the normalising below is the backstop.
        env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    return result.returncode, output, " ".join(output.split())


def append_line(path: Path, line: str) -> int:
    """Append ``line`` to the file at ``path``; its line number."""
    text = path.read_text()
    if not text.endswith("\n"):
        text += "\n"
    text += line + "\n"
    path.write_text(text)
    return text.count("\n")


def test_repository_keeps_the_import_contracts():
    code, output, _ = lint_imports(ROOT)
    assert code == 0, f"lint-imports found broken contracts:\n{output}"


def test_a_violating_import_breaks_its_contract(tmp_path):
    def not_python(folder: str, names: list[str]) -> list[str]:
        return [
            n for n in names if n == "__pycache__" or (Path(folder, n).is_file() and not n.endswith(".py"))
        ]

    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=not_python)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    engine_line = append_line(tmp_path / "server/engine/cache.py", "import server.api.errors  # noqa")
    client_line = append_line(tmp_path / "server/client/types.py", "import torch  # noqa")

    # The copies come first on the path (lint-imports also puts its cwd first), ahead of the
    # editable install of the repository; the chains below exist only in the copies.
    code, output, line = lint_imports(tmp_path, PYTHONPATH=str(tmp_path))

    assert code != 0, output
    assert f"{contract_name('server.engine')} BROKEN" in line, output
    assert f"server.engine.cache -> server.api.errors (l.{engine_line})" in line, output
    assert f"{contract_name('server.client')} BROKEN" in line, output
    assert f"server.client.types -> torch (l.{client_line})" in line, output
