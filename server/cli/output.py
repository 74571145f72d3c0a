"""How the CLI prints: tables and JSON for results, one red line for errors."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import typer
from rich.console import Console
from rich.table import Table

from adapters.errors import LoraloomError
from server.client.errors import Unreachable

console = Console()
errors = Console(stderr=True)


def as_json(value) -> str:
    def default(item):
        if dataclasses.is_dataclass(item):
            return dataclasses.asdict(item)
        if isinstance(item, bytes):
            return f"<{len(item)} bytes>"
        raise TypeError(type(item).__name__)

    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.dumps(value, default=default, indent=2, sort_keys=True)


def fail(error: LoraloomError, target: str | None = None) -> typer.Exit:
    """Print ``error`` for a person and return the exit to raise (code 1)."""
    errors.print(f"[red]error[/red] ({type(error).__name__}): {error}", highlight=False, markup=True)
    if isinstance(error, Unreachable) and target:
        errors.print(f"is `loraloom serve` running at {target}? (set --server or LORALOOM_SERVER)")
    return typer.Exit(1)


def size(num: int) -> str:
    value = float(num)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(num)


def when(seconds: float) -> str:
    if not seconds:
        return ""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")


def adapter_table(adapters) -> Table:
    table = Table(show_edge=False)
    for column in ("ref", "aliases", "arch", "rank", "format", "size", "sha256", "created (UTC)"):
        table.add_column(column)
    for item in adapters:
        table.add_row(
            item.ref,
            ",".join(item.aliases),
            item.architecture,
            str(item.rank),
            item.format,
            size(item.size_bytes),
            item.sha256[:12],
            when(item.created_at),
        )
    return table
