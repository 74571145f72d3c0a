"""Resident memory of a process, read from /proc (Linux), for the load and drift tests."""

from __future__ import annotations

import threading
import time


def rss_bytes(pid: int | str = "self") -> int:
    """The process's resident set size now (``VmRSS``), in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


class PeakRss:
    """Samples ``rss_bytes`` every ``interval_s`` on a thread while the block runs.

    ``with PeakRss() as peak: ...``, then ``peak.start``, ``peak.peak`` and ``peak.growth``
    (the highest sample less the one taken on entry).
    """

    def __init__(self, pid: int | str = "self", interval_s: float = 0.005) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.start
