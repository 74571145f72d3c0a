"""The training progress bar: step, steps/s, ETA, loss and learning rate.

tqdm's own rate and remaining time count everything between two updates, so a
step that also sampled images or saved a checkpoint reads as a slow step and the
ETA jumps after each one. ``RunClock`` keeps the two apart: steps/s is over the
last ``WINDOW`` optimizer steps only, and the ETA is the steps left at that rate
plus the sampling and checkpoints still to come at the time each kind took so
far. The bar shows them as ``1.52 steps/s`` (``4.10 s/step`` below one) and
``ETA 03:12``; ``Trainer.run``'s ``on_step`` gets the same numbers in ``StepInfo``.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

WINDOW = 50  # optimizer steps the rate is measured over
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def format_rate(steps_per_second: float | None) -> str:
    if not steps_per_second:
        return "? steps/s"
    if steps_per_second >= 1:
        return f"{steps_per_second:.2f} steps/s"
    return f"{1 / steps_per_second:.2f} s/step"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


@dataclass
class RunClock:
    """Step time and side work (sampling, checkpoints) measured apart; the rate and the ETA from them.

    ``events``: for each kind of side work, the steps at which it happens (``Collection``
    or a predicate), to count how many are left.
    """

    total_steps: int
    events: dict[str, Collection[int] | Callable[[int], bool]] = field(default_factory=dict)
    _steps: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    _side: dict[str, list[float]] = field(default_factory=dict)

    def step_took(self, seconds: float) -> None:
        self._steps.append(max(seconds, 1e-9))

    def side_took(self, kind: str, seconds: float) -> None:
        self._side.setdefault(kind, []).append(seconds)

    @property
    def steps_per_second(self) -> float | None:
        return len(self._steps) / sum(self._steps) if self._steps else None

    def events_left(self, kind: str, step: int) -> int:
        when = self.events.get(kind)
        if when is None:
            return 0
        later = range(step + 1, self.total_steps + 1)
        if callable(when):
            return sum(1 for s in later if when(s))
        return sum(1 for s in when if step < s <= self.total_steps)

    def eta(self, step: int) -> float | None:
        """Seconds until the run ends, from ``step`` done; ``None`` before the first step is timed."""
        rate = self.steps_per_second
        if rate is None:
            return None
        seconds = (self.total_steps - step) / rate
        for kind, took in self._side.items():
            seconds += self.events_left(kind, step) * sum(took) / len(took)
        return seconds

    @contextlib.contextmanager
    def timing_step(self) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.step_took(time.perf_counter() - started)

    @contextlib.contextmanager
    def timing(self, kind: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.side_took(kind, time.perf_counter() - started)


class ProgressBar:
    """A tqdm bar over the optimizer steps that shows ``RunClock``'s rate and ETA."""

    def __init__(self, clock: RunClock, *, initial: int, desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.clock = clock
        self.bar = tqdm(
            total=clock.total_steps,
            initial=initial,
            desc=desc,
            unit="step",
            disable=not enabled,
            dynamic_ncols=True,
            bar_format=BAR_FORMAT,
        )
        self._fields = ""

    def update(self, step: int, **fields: str) -> None:
        """After optimizer step ``step``: advance the bar and show the rate, the ETA and ``fields``."""
        self._fields = ", ".join(f"{key}={value}" for key, value in fields.items())
        self.bar.set_postfix_str(self._text(step), refresh=False)
        self.bar.update(step - self.bar.n)

    def busy(self, what: str) -> None:
        """Say on the bar what the run does between steps (``sampling``, ``checkpoint``)."""
        self.bar.set_postfix_str(f"{self._text(int(self.bar.n))}, {what}…", refresh=True)

    def _text(self, step: int) -> str:
        parts = [format_rate(self.clock.steps_per_second), f"ETA {format_duration(self.clock.eta(step))}"]
        return ", ".join(parts + ([self._fields] if self._fields else []))

    def close(self) -> None:
        self.bar.set_postfix_str(self._text(int(self.bar.n)), refresh=False)  # no "sampling…" left over
        self.bar.close()
