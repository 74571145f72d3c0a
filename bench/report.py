"""Metrics of a suite: ratios, a rich table, and the JSON form."""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Metric:
    """One figure for loraloom and for the peer; ``ratio`` > 1 means loraloom is ahead.

    ``better`` says which direction wins. For ``pct`` overheads the ratio compares
    the resulting times, ``(100 + peer) / (100 + loraloom)``, so it stays meaningful
    when loraloom's overhead is at or below zero.
    """

    name: str
    loraloom: float
    peer: float
    unit: str
    better: str
    note: str = ""

    @property
    def ratio(self) -> float:
        if self.unit == "pct":
            return (100.0 + self.peer) / (100.0 + self.loraloom)
        if self.better == "lower":
            return self.peer / self.loraloom if self.loraloom > 0 else float("inf")
        return self.loraloom / self.peer if self.peer > 0 else float("inf")

    def as_json(self) -> dict[str, object]:
        return {
            "loraloom": round(self.loraloom, 4),
            "peer": round(self.peer, 4),
            "unit": self.unit,
            "ratio": round(self.ratio, 3),
            "better": self.better,
        }


def quiet_peers() -> None:
    """Silence the peers' per-call warnings and progress bars (diffusers, PEFT, transformers, LyCORIS)."""
    import warnings

    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
    warnings.filterwarnings("ignore", message="Already unmerged")  # PEFT: unfuse with nothing fused
    for name in ("transformers", "diffusers", "peft", "LyCORIS"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Through the libraries' own setters: a library configuring its root logger later resets its level.
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1000.0


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def cpu_timed(fn: Callable[[], object]) -> float:
    """CPU seconds this process spends in one call of ``fn`` (immune to other processes' load)."""
    started = time.process_time()
    fn()
    return time.process_time() - started


def write_json(path: str | Path, suite: str, metrics: Sequence[Metric], *, peer: str, quick: bool) -> None:
    document = {
        "suite": suite,
        "peer": peer,
        "quick": quick,
        "metrics": {metric.name: metric.as_json() for metric in metrics},
    }
    Path(path).write_text(json.dumps(document, indent=2) + "\n")


def print_table(suite: str, metrics: Sequence[Metric], *, peer: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bench {suite}: loraloom vs {peer} (medians)")
    for column, justify in (("metric", "left"), ("loraloom", "right"), ("peer", "right"), ("unit", "left")):
        table.add_column(column, justify=justify)
    table.add_column("ratio (>1: loraloom ahead)", justify="right")
    table.add_column("note", justify="left")
    for metric in metrics:
        ratio = metric.ratio
        style = "green" if ratio >= 1 else "red"
        table.add_row(
            metric.name,
            f"{metric.loraloom:.3f}",
            f"{metric.peer:.3f}",
            metric.unit,
            f"[{style}]{ratio:.2f}x[/{style}]",
            metric.note,
        )
    Console().print(table)


def run_script(script: str, args: Sequence[str], marker: str, what: str) -> dict:
    """Run ``python -c script args`` from the repository root and return the JSON it printed after
    ``marker`` on its last such line (a fresh process: its own memory, its own imports)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1][len(marker) :])


def process_memory_mb(pid: int | str = "self") -> dict[str, float]:
    """``VmRSS``, ``VmHWM`` (peak), ``RssAnon`` and ``RssFile`` of a process (this one by default), in MB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
