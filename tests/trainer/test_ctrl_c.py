"""A real Ctrl-C (SIGINT) to a real ``loraloom train`` process: checkpoint, message, exit 130."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path, shapes_dir):
    work = tmp_path / "work"
    env = {**os.environ, "LORALOOM_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "server.cli.main", "train", str(shapes_dir), "--base", "micro",
        "--steps", "100000", "--resolution", "16", "--batch-size", "2", "--output-dir", str(work),
        "--progress",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=Path(__file__).parents[2]
    )
    try:
        seen = b""
        deadline = time.monotonic() + 120
        while not re.search(rb"\| *[1-9][0-9]*/100000", seen):  # the bar shows a finished step
            chunk = os.read(process.stderr.fileno(), 4096)
            assert chunk and time.monotonic() < deadline, seen.decode(errors="replace")[-2000:]
            seen += chunk
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    output = (seen + stderr).decode(errors="replace")
    assert process.returncode == 130, output[-2000:]
    assert "training stopped at step" in output and "Resume with --resume latest" in output
    checkpoints = sorted(work.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "lora.safetensors").is_file()
    assert not (work / "shapes.safetensors").exists()
