"""Readiness under memory pressure: after N consecutive out-of-memory failures, report not ready.

A replica whose generations keep running out of memory should stop receiving
traffic (Kubernetes drops it from the Service while readiness is NOT_SERVING)
without being killed: liveness stays SERVING. Any successful generation makes it
ready again; so that an idle replica can recover on its own, a small probe
generation is retried every ``probe_every_s`` while not ready.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from adapters.errors import OutOfMemory

log = logging.getLogger(__name__)

ReadinessListener = Callable[[bool], None]


class OutOfMemoryWatch:
    """A service observer (``(request, result, error)``) that tracks consecutive out-of-memory failures."""

    def __init__(self, unready_after: int, probe: Callable[[], None], probe_every_s: float = 10.0) -> None:
        self.unready_after = max(1, int(unready_after))
        self.listeners: list[ReadinessListener] = []
        self._probe = probe
        self._probe_every_s = probe_every_s
        self._streak = 0
        self.ready = True
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._closed = False

    def __call__(self, request, result=None, error: BaseException | None = None) -> None:
        if result is not None:
            self._set(streak=0, ready=True)
        elif isinstance(error, OutOfMemory):
            with self._lock:
                streak = self._streak + 1
            self._set(streak=streak, ready=streak < self.unready_after)

    def _set(self, *, streak: int, ready: bool) -> None:
        with self._lock:
            self._streak = streak
            changed = ready != self.ready
            self.ready = ready
        if not changed:
            return
        if ready:
            log.info("a generation succeeded: ready again")
        else:
            log.warning("%d generations in a row ran out of memory: readiness NOT_SERVING", streak)
            self._schedule_probe()
        for listener in list(self.listeners):
            try:
                listener(ready)
            except Exception:
                log.exception("readiness listener %r failed", listener)

    def _schedule_probe(self) -> None:
        with self._lock:
            if self._closed or self.ready:
                return
            self._timer = threading.Timer(self._probe_every_s, self._run_probe)
            self._timer.daemon = True
            self._timer.start()

    def _run_probe(self) -> None:
        try:
            self._probe()  # its outcome reaches __call__ like any generation's
        except Exception as error:
            log.info("readiness probe failed: %s", error)
        self._schedule_probe()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
