"""The blend-aware scheduler in front of the engine: a bounded queue, one worker thread.

Requests arrive normalized and resolved (``Job``): the scheduler never touches the
store. Queued requests are served in *runs*: a run is the requests of one blend
(one resolved signature: ``striped`` and ``striped@1`` are the same blend) that
are waiting when it starts, so a swap is paid once per run, not per request.
The next run keeps the blend already in the weights when it can, else takes
the oldest request's blend. Unfairness is bounded: a run never takes a request
that would pass over a waiting request which ``max_group_skips`` runs have
already passed over, and that request's blend goes next. ``max_group_skips=0``
is plain FIFO.

All torch work runs on the worker thread, never on the caller's (or an
asyncio loop's) thread. ``submit`` only enqueues.

While a run generates, a second thread (the prefetcher) loads the adapters of
the next ``prefetch_blends`` distinct blends waiting in the queue into the
engine's adapter cache (``Engine.prefetch``), so a request that waited behind
another does not pay its cold adapters' load (parse, validate, prepare) on the
critical path. It never takes the engine's run lock and never evicts what the
running blend or the blends ahead of it use; cancelled or expired requests are
not prefetched. Blend *plans* are not built ahead: ``FusedWeights.plan`` sets
torch's process-wide thread count while the running step computes, and making
room in the plan cache recycles an evicted blend's memory, which may be the
very slab the running blend's weights point at; both need the run lock.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from adapters.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from server.engine.engine import BatchEntry, CancelFlag, Engine
from server.engine.types import GenerateResult, Job, Progress, QueueStats
from server.settings import SchedulerSettings

log = logging.getLogger(__name__)

ProgressCallback = Callable[[Progress], None]


PREFETCH_BLENDS = 2  # queued blends whose adapters are loaded ahead (0: none)
RETRY_MIN_S = 0.5
RETRY_MAX_S = 60.0
RECENT = 16


class StepCosts:
    """Recent per-step and per-request (encode, decode, swap) costs; estimates by their medians."""

    def __init__(self) -> None:
        self._step_s: deque[float] = deque(maxlen=RECENT)
        self._rest_s: deque[float] = deque(maxlen=RECENT)

    def observe(self, steps: int, timings) -> None:
        self._step_s.append(timings.denoise_ms / 1000.0 / max(steps, 1))
        rest = timings.encode_ms + timings.decode_ms + timings.load_ms + timings.swap_ms
        self._rest_s.append(rest / 1000.0)

    def estimate(self, steps: int) -> float:
        """Seconds a request of ``steps`` takes (1 s before anything was observed)."""
        if not self._step_s:
            return 1.0
        return statistics.median(self._step_s) * steps + statistics.median(self._rest_s)


@dataclass(eq=False)
class _Item:
    seq: int
    job: Job
    future: Future
    on_progress: ProgressCallback | None
    cancel: CancelFlag | None
    enqueued: float
    skips: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    counted: bool = True  # False: the server's own (warm-up, readiness probe), left out of stats()

    @property
    def key(self) -> tuple[tuple[str, float], ...]:
        """The resolved blend's signature: what runs group by."""
        return self.job.blend.signature

    def is_set(self) -> bool:
        """Cancelled by the caller or stopped by the scheduler (the engine polls this)."""
        return self.stop.is_set() or (self.cancel is not None and self.cancel.is_set())


class Scheduler:
    """Runs requests on ``engine`` one at a time from a bounded, blend-grouped queue."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_queue: int = SchedulerSettings.max_queue,
        max_group_skips: int = SchedulerSettings.max_group_skips,
        max_batch: int = SchedulerSettings.max_batch,
        prefetch_blends: int = PREFETCH_BLENDS,
    ) -> None:
        """``max_batch`` > 1 lets up to that many requests of one run (same blend, size, steps,
        guidance and sampler) share one denoising loop: several times the throughput of
        small models on a CPU, at the cost of bit-exact reproducibility (a batched image
        equals the one made alone to about 1e-6 before 8-bit rounding, not bit for bit).
        ``prefetch_blends``: how many distinct queued blends (next in line first) have their
        adapters loaded ahead while another run generates; 0 turns the prefetcher off.
        """
        if max_queue < 1 or max_group_skips < 0 or max_batch < 1 or prefetch_blends < 0:
            raise ValueError("max_queue and max_batch must be >= 1, max_group_skips and prefetch_blends >= 0")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_group_skips = max_group_skips
        self._cond = threading.Condition()
        self._queue: list[_Item] = []
        self._run: set[int] = set()
        self._current_key: tuple[tuple[str, float], ...] | None = None
        self._running: list[_Item] = []
        self._closed = False
        self._seq = 0
        self._costs = StepCosts()
        self._running_since = 0.0
        self._completed = self._failed = self._cancelled = self._rejected = 0
        self._deadline_exceeded = self._invalid = 0
        self.prefetch_blends = prefetch_blends
        self._prefetched: set[tuple[tuple[str, float], ...]] = set()  # blends loaded ahead, while queued
        self._generating = False  # the engine runs a batch now (its requests' results not yet given)
        self._worker = threading.Thread(target=self._loop, name="loraloom-engine", daemon=True)
        self._worker.start()
        self._prefetcher: threading.Thread | None = None
        if prefetch_blends:
            self._prefetcher = threading.Thread(
                target=self._prefetch_loop, name="loraloom-prefetch", daemon=True
            )
            self._prefetcher.start()

    # ------------------------------------------------------------ callers

    def submit(
        self,
        job: Job,
        on_progress: ProgressCallback | None = None,
        cancel: CancelFlag | None = None,
        *,
        counted: bool = True,
    ) -> Future[GenerateResult]:
        """Enqueue ``job`` (``Engine.job`` makes one); the future gives the result or a typed error.

        Raises ``ResourceExhausted`` (with ``retry_after_s``) when the queue is full and
        ``Unavailable`` once closing. ``counted=False``: the server's own request (warm-up,
        readiness probe), left out of ``stats()``.
        """
        future: Future[GenerateResult] = Future()
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down; retry on another replica")
            dropped = self._purge_locked()
            if len(self._queue) >= self.max_queue:
                if counted:
                    self._rejected += 1
                retry = self._retry_after_locked()
                raise ResourceExhausted(
                    f"the queue is full ({self.max_queue} requests waiting); retry in about {retry:.1f} s",
                    retry_after_s=retry,
                )
            self._seq += 1
            item = _Item(self._seq, job, future, on_progress, cancel, time.perf_counter(), counted=counted)
            self._queue.append(item)
            position = len(self._queue) - 1 + len(self._running)
            self._cond.notify_all()
        self._finish_dropped(dropped)
        self._emit(item, Progress("queued", queue_position=position))
        return future

    def stats(self) -> QueueStats:
        with self._cond:
            return QueueStats(
                queued=len(self._queue),
                running=len(self._running),
                completed=self._completed,
                failed=self._failed,
                cancelled=self._cancelled,
                rejected=self._rejected,
                max_queue=self.max_queue,
                deadline_exceeded=self._deadline_exceeded,
                invalid=self._invalid,
            )

    def refused(self, error: BaseException) -> None:
        """Count a request refused before it reached the queue: INVALID_ARGUMENT counts as
        ``invalid`` (the queue counts every other outcome itself)."""
        if isinstance(error, InvalidArgument):
            with self._cond:
                self._invalid += 1

    def close(self, drain: bool = True, timeout: float = 30.0) -> bool:
        """Stop accepting and end the worker; True once it has ended (False: still inside a step).

        ``drain``: finish what is queued first, for up to ``timeout`` s. Then (at once
        without ``drain``) what is still queued fails with ``Unavailable`` and the running
        requests' stop flags are set, so they fail at their next step or stage. The worker
        is waited for until ``timeout`` s after the call (with ``drain``, at least 5 s
        more for the step it is in). A step runs in native code (torch, OpenVINO) that
        cannot be interrupted: a caller that must exit on time checks the result (or
        ``stopped``) and, if False, exits without tearing the interpreter down under the
        running step (see ``server.api.process``).
        """
        started = time.monotonic()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if drain:
            self._worker.join(timeout)
        with self._cond:
            abandoned, self._queue = self._queue, []
            for item in self._running:
                item.stop.set()
            self._cond.notify_all()
        for item in abandoned:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(Unavailable("the server shut down before this request ran"))
        left = timeout - (time.monotonic() - started)
        self._worker.join(max(5.0, left) if drain else max(0.0, left))
        if self._prefetcher is not None:  # ends once the queue is empty; at most one load to finish
            self._prefetcher.join(max(1.0, timeout - (time.monotonic() - started)))
        return self.stopped

    @property
    def stopped(self) -> bool:
        """Whether the worker thread (and the prefetcher) have ended (after ``close``)."""
        return not self._worker.is_alive() and not (
            self._prefetcher is not None and self._prefetcher.is_alive()
        )

    # ------------------------------------------------------------ worker

    def _loop(self) -> None:
        while True:
            waiting: list[tuple[_Item, int]] = []
            batch: list[_Item] = []
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                dropped = self._purge_locked()
                if self._queue:
                    batch = self._batch_locked(self._pick_locked())
                    for item in batch:
                        self._queue.remove(item)
                    self._running = batch
                    waiting = [(i, n) for n, i in enumerate(self._queue) if i.on_progress is not None]
                elif self._closed:
                    self._finish_dropped(dropped)
                    return
            self._finish_dropped(dropped)
            if not batch:
                continue
            for other, position in waiting:
                self._emit(other, Progress("queued", queue_position=position + 1))
            try:
                self._serve(batch)
            finally:
                with self._cond:
                    self._running = []

    def _prefetch_loop(self) -> None:
        """The prefetcher: load the next queued blends' adapters while the worker generates."""
        while True:
            with self._cond:
                while True:
                    if self._closed and not self._queue:
                        return
                    target = self._prefetch_target_locked()
                    if target is not None:
                        break
                    self._cond.wait()
                item, protect = target
                self._prefetched.add(item.key)
            try:
                self.engine.prefetch(item.job.blend, protect)
            except Exception:  # Engine.prefetch swallows load errors; this is a last guard
                log.debug("prefetch of request %d's blend failed; ignored", item.seq, exc_info=True)

    def _prefetch_target_locked(self) -> tuple[_Item, frozenset[str]] | None:
        """The first of the next ``prefetch_blends`` distinct queued blends (not running, with
        adapters, of a request still wanted) not prefetched yet, and the adapters a prefetch must
        not evict: the running batch's and those of the blends before it in line. Nothing while
        the engine runs no batch: the worker is about to take the queue's head and load it itself
        (a prefetch would only race it, and a caller that waits for one result before sending the
        next would see its adapters loaded twice when they fail); the blends behind are looked at
        once the next batch generates."""
        queued = {item.key for item in self._queue}
        self._prefetched &= queued  # forget blends that left the queue: they may come back later
        if not self._generating:
            return None
        running = {item.key for item in self._running}
        protect = {resolved.sha256 for item in self._running for resolved, _ in item.job.blend.entries}
        seen: set[tuple[tuple[str, float], ...]] = set()
        now = time.monotonic()
        for item in self._queue:
            if len(seen) >= self.prefetch_blends:
                break
            key = item.key
            if not key or key in running or key in seen:
                continue
            deadline = item.job.options.deadline
            if item.future.cancelled() or item.is_set() or (deadline is not None and now >= deadline):
                continue
            if key not in self._prefetched:
                return item, frozenset(protect)
            seen.add(key)
            protect.update(resolved.sha256 for resolved, _ in item.job.blend.entries)
        return None

    def _batch_locked(self, first: _Item) -> list[_Item]:
        """``first`` and, up to ``max_batch``, later requests of its run that can share its loop."""
        batch = [first]
        shape = first.job.settings.batch_key
        for item in self._queue:
            if len(batch) >= self.max_batch:
                break
            if item is not first and item.seq in self._run and item.job.settings.batch_key == shape:
                batch.append(item)
        return batch

    def _serve(self, batch: list[_Item]) -> None:
        with self._cond:
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            for item in batch:
                if item not in live:
                    self._count_locked(item, Cancelled("cancelled"))
        if not live:
            return
        started = time.perf_counter()
        with self._cond:
            self._running_since = started
            self._generating = True
            self._cond.notify_all()  # the prefetcher: the next in line can be loaded now
        self._current_key = live[0].key
        entries = [
            BatchEntry(
                item.job,
                (lambda p, item=item: self._emit(item, p)) if item.on_progress else None,
                item,
                (started - item.enqueued) * 1000.0,
            )
            for item in live
        ]
        try:
            outcomes: list[GenerateResult | Exception] = self.engine.generate_batch(entries)
        except Exception as error:
            outcomes = [error] * len(live)
        except BaseException:
            for item in live:
                item.future.set_exception(Cancelled("the worker was interrupted"))
            raise
        finally:
            with self._cond:  # before the results go out: a caller's next request is not prefetched
                self._generating = False
        for item, outcome in zip(live, outcomes, strict=True):
            if isinstance(outcome, Exception):
                if isinstance(outcome, Cancelled) and item.stop.is_set():
                    outcome = Unavailable("the server shut down while this request ran")
                with self._cond:
                    self._count_locked(item, outcome)
                item.future.set_exception(outcome)
            else:
                with self._cond:
                    self._count_locked(item, None)
                    self._costs.observe(item.job.settings.steps, outcome.timings)
                item.future.set_result(outcome)

    def _count_locked(self, item: _Item, error: BaseException | None) -> None:
        """Count ``item``'s outcome (``None``: completed) unless it is the server's own request."""
        if not item.counted:
            return
        if error is None:
            self._completed += 1
        elif isinstance(error, DeadlineExceeded):
            self._deadline_exceeded += 1
        elif isinstance(error, Cancelled):
            self._cancelled += 1
        elif isinstance(error, InvalidArgument):
            self._invalid += 1
        else:
            self._failed += 1

    def _retry_after_locked(self) -> float:
        """When a queue slot frees: the running batch's remaining time, from the observed cost of a
        denoising step and of the rest of a request (medians of recent requests, so one slow first
        request does not inflate it), clamped to [0.5, 60] s."""
        if not self._running:
            return RETRY_MIN_S
        steps = max(item.job.settings.steps for item in self._running)
        left = self._costs.estimate(steps) - (time.perf_counter() - self._running_since)
        return min(max(left, RETRY_MIN_S), RETRY_MAX_S)

    def _pick_locked(self) -> _Item:
        """The next item: continue the current run, else start a new one (see the module docstring)."""
        for item in self._queue:
            if item.seq in self._run:
                return item
        limit = self.max_group_skips
        starved = [item for item in self._queue if item.skips >= limit]
        if starved:
            key = starved[0].key
        elif any(item.key == self._current_key for item in self._queue):
            key = self._current_key
        else:
            key = self._queue[0].key
        members: list[_Item] = []
        for item in self._queue:
            if item.key != key:
                continue
            passed = [o for o in self._queue if o.key != key and o.seq < item.seq]
            if any(o.skips >= limit for o in passed):
                break
            members.append(item)
        if not members:  # the oldest waiting request of this blend is itself due
            members = [next(item for item in self._queue if item.key == key)]
        newest = members[-1].seq
        for other in self._queue:
            if other.key != key and other.seq < newest:
                other.skips += 1
        self._run = {item.seq for item in members}
        return members[0]

    def _purge_locked(self) -> list[tuple[_Item, Exception | None]]:
        """Take cancelled and expired requests out of the queue (futures are failed outside the lock)."""
        now = time.monotonic()
        dropped: list[tuple[_Item, Exception | None]] = []
        for item in list(self._queue):
            error: Exception | None = None
            if item.future.cancelled():
                pass
            elif item.job.options.deadline is not None and now >= item.job.options.deadline:
                # before the cancel flag: gRPC also cancels a call whose deadline passed
                error = DeadlineExceeded("the request's deadline passed while it was queued")
            elif item.is_set():
                error = Cancelled("the request was cancelled while queued")
            else:
                continue
            self._queue.remove(item)
            self._count_locked(item, error or Cancelled("cancelled"))
            dropped.append((item, error))
        return dropped

    @staticmethod
    def _finish_dropped(dropped: list[tuple[_Item, Exception | None]]) -> None:
        for item, error in dropped:
            if error is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(error)

    @staticmethod
    def _emit(item: _Item, progress: Progress) -> None:
        if item.on_progress is None:
            return
        try:
            item.on_progress(progress)
        except Exception:
            log.exception("progress callback of request %d failed; ignored", item.seq)
