"""How the CLI prints: tables and JSON for results, one red line for errors."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import typer
from rich import box
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


def fail(error: LoraloomError, target: str | None = None, *, request_id: str = "") -> typer.Exit:
    """Print ``error`` for a person and return the exit to raise (code 1)."""
    errors.print(f"[red]error[/red] ({type(error).__name__}): {error}", highlight=False, markup=True)
    if isinstance(error, Unreachable):
        if target:
            errors.print(f"is `loraloom serve` running at {target}? (set --server or LORALOOM_SERVER)")
    elif request_id:
        errors.print(f"request {request_id} (in the server's log lines of this request)", highlight=False)
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


WIDE_TABLE = 120  # columns from which `adapters list` also shows format and sha256


def adapter_table(adapters, width: int = WIDE_TABLE) -> Table:
    """One row per version; narrower than :data:`WIDE_TABLE`, format, sha256 and date are left to `show`."""
    adapters = list(adapters)
    wide = width >= WIDE_TABLE
    table = Table(show_edge=False, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("ref", no_wrap=True, min_width=max((len(item.ref) for item in adapters), default=3))
    columns = ["aliases", "arch", "rank", *(["format"] if wide else []), "size"]
    columns += ["sha256", "created (UTC)"] if wide else []
    for column in columns:
        table.add_column(column, overflow="fold")
    for item in adapters:
        cells = [",".join(item.aliases), item.architecture, str(item.rank)]
        cells += [item.format] if wide else []
        cells.append(size(item.size_bytes))
        cells += [item.sha256[:12], when(item.created_at)] if wide else []
        table.add_row(item.ref, *cells)
    return table
