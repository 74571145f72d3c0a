"""The `generate` progress bar: queue position, then denoising steps."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from server.client import types


class GenerateProgress:
    """A context manager whose ``update`` takes the client's stream events."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=True,
            disable=not enabled,
        )
        self._task = None

    def __enter__(self) -> GenerateProgress:
        self._bar.__enter__()
        self._task = self._bar.add_task("queued", total=None)
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def update(self, event: types.StreamEvent) -> None:
        if isinstance(event, types.Queued):
            self._bar.update(self._task, description=f"queued ({event.position} ahead)")
        elif isinstance(event, types.Progress):
            total = event.total_steps
            self._bar.update(self._task, description="denoising", completed=event.step, total=total)
        elif isinstance(event, types.ImageReady):
            self._bar.update(self._task, description=f"image {event.index + 1} received")
