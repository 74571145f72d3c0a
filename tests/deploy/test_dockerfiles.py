"""deploy/docker: a parser-level lint (no Docker engine runs here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("Dockerfile*"))
PINNED_IMAGE = re.compile(r"^[\w./-]+(:\d[\w.-]*)(@sha256:[0-9a-f]{64})?$|^[\w./-]+@sha256:[0-9a-f]{64}$")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def test_both_images_exist():
    assert {path.name for path in DOCKERFILES} >= {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_policy(path):
    steps = instructions(path)
    stages = [args.split()[0] for word, args in steps if word == "FROM"]
    assert stages, "no FROM"
    for image in stages:
        assert "latest" not in image and PINNED_IMAGE.match(image), f"unpinned base image {image}"
    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]
    users = [args for word, args in final if word == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    volumes = " ".join(args for word, args in final if word == "VOLUME")
    assert "/models" in volumes and "/var/lib/loraloom" in volumes
    runs = " ".join(args for word, args in steps if word == "RUN")
    for spec in re.findall(r"pip install ([^&]+)", runs):
        for word in shlex.split(spec):
            if word.startswith("torch"):
                assert "==" in word, f"torch must be pinned: {word}"
            if word.startswith(".["):
                assert "-c constraints.txt" in spec, "install the project with the constraints file"
    entry = [args for word, args in final if word == "ENTRYPOINT"]
    assert entry and "loraloom" in entry[-1]
    for word, args in steps:
        if word == "COPY" and "--from=" not in args:
            for source in shlex.split(args)[:-1]:
                if not source.startswith("--"):
                    assert (ROOT / source).exists(), f"COPY source {source} is missing"
