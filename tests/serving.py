"""A ``loraloom serve`` subprocess for tests: its log collected line by line, its address from the log."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time

import pytest

from server.api.codegen import REPO_ROOT

LISTENING = re.compile(r"listening on (127\.0\.0\.1:\d+)")


class Serving:
    """A ``loraloom serve`` subprocess; a thread collects its log (stderr) line by line."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli.main", "serve", "--port", "0", *args],
            cwd=REPO_ROOT,
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.log: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)
            self._lines.put(line)

    @property
    def text(self) -> str:
        return "".join(self.log)

    def address(self, timeout: float = 120) -> str:
        """The address it listens on (from its log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                match = LISTENING.search(self._lines.get(timeout=1))
            except queue.Empty:
                assert self.process.poll() is None, self.text
                continue
            if match:
                return match.group(1)
        pytest.fail(f"no 'listening on' line in {timeout:g}s:\n{self.text}")

    def wait_logged(self, needle: str, timeout: float = 10) -> bool:
        """Whether ``needle`` is in the log within ``timeout`` (the log is read by another thread)."""
        deadline = time.monotonic() + timeout
        while needle not in self.text and time.monotonic() < deadline:
            time.sleep(0.02)
        return needle in self.text

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
