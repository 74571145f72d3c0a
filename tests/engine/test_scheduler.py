from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from adapters.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from server.engine import GenerateRequest
from server.engine.scheduler import Scheduler
from tests.engine.conftest import make_engine

BLENDS = {"A": [("ink", 1.0)], "B": [("neon", 0.5)], "C": [("clay", 0.7), ("moss", 0.3)]}


class Turnstile:
    """An engine seam that holds every request at its first step until the test lets it through."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.passes = threading.Semaphore(0)

    def __call__(self, index: int, total: int) -> None:
        if index == 0:
            self.entered.release()
            assert self.passes.acquire(timeout=30), "the test never let the request through"

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=30), "no request reached the engine"

    def release(self, count: int = 1) -> None:
        for _ in range(count):
            self.passes.release()


@pytest.fixture()
def gated(micro_pipeline, micro_adapters):
    turnstile = Turnstile()
    engine = make_engine(micro_pipeline, "micro", micro_adapters, before_step=turnstile)
    schedulers: list[Scheduler] = []

    def start(**kwargs) -> Scheduler:
        scheduler = Scheduler(engine, **kwargs)
        schedulers.append(scheduler)
        return scheduler

    yield engine, turnstile, start
    turnstile.release(100)
    for scheduler in schedulers:
        scheduler.close(drain=False, timeout=10)


def request(blend: str, seed: int = 0, steps: int = 1, **kwargs) -> GenerateRequest:
    return GenerateRequest("a fox", steps=steps, seed=seed, adapters=BLENDS[blend], **kwargs)


def submit_recorded(scheduler: Scheduler, order: list[str], label: str, blend: str, **kwargs):
    future = scheduler.submit(scheduler.engine.job(request(blend, **kwargs)))
    future.add_done_callback(lambda _: order.append(label))
    return future


def test_requests_are_grouped_by_blend(gated):
    engine, turnstile, start = gated
    scheduler = start(max_queue=16, max_group_skips=4)
    order: list[str] = []
    futures = [submit_recorded(scheduler, order, "A0", "A")]
    turnstile.wait_entered()
    for label in ("B1", "A2", "B3", "A4", "C5"):
        futures.append(submit_recorded(scheduler, order, label, label[0]))
    swaps_before = engine.stats().swaps
    turnstile.release(6)
    for future in futures:
        future.result(timeout=60)
    assert order == ["A0", "A2", "A4", "B1", "B3", "C5"]
    assert engine.stats().swaps - swaps_before == 2  # A was already in; B once, C once
    swapped = {
        label: f.result().timings.swap_ms > 0
        for label, f in zip(["A0", "B1", "A2", "B3", "A4", "C5"], futures, strict=True)
    }
    assert swapped == {"A0": True, "B1": True, "A2": False, "B3": False, "A4": False, "C5": True}


@pytest.mark.parametrize(
    ("skips", "expected"), [(1, ["A0", "A2", "B1", "A3"]), (4, ["A0", "A2", "A3", "B1"])]
)
def test_unfairness_is_bounded(gated, skips, expected):
    _, turnstile, start = gated
    scheduler = start(max_queue=16, max_group_skips=skips)
    order: list[str] = []
    futures = [submit_recorded(scheduler, order, "A0", "A")]
    turnstile.wait_entered()
    futures += [submit_recorded(scheduler, order, "B1", "B"), submit_recorded(scheduler, order, "A2", "A")]
    turnstile.release()
    turnstile.wait_entered()  # A2 runs, passing B1 over once
    futures.append(submit_recorded(scheduler, order, "A3", "A"))
    turnstile.release(3)
    for future in futures:
        future.result(timeout=60)
    assert order == expected


def test_zero_skips_is_fifo(gated):
    _, turnstile, start = gated
    scheduler = start(max_queue=16, max_group_skips=0)
    order: list[str] = []
    futures = [submit_recorded(scheduler, order, "A0", "A")]
    turnstile.wait_entered()
    futures += [submit_recorded(scheduler, order, label, label[0]) for label in ("B1", "A2", "C3", "A4")]
    turnstile.release(5)
    for future in futures:
        future.result(timeout=60)
    assert order == ["A0", "B1", "A2", "C3", "A4"]


def test_a_full_queue_is_refused_with_a_retry_hint(gated):
    _, turnstile, start = gated
    scheduler = start(max_queue=2, max_group_skips=4)
    running = scheduler.submit(scheduler.engine.job(request("A")))
    turnstile.wait_entered()
    waiting = [
        scheduler.submit(scheduler.engine.job(request("B"))),
        scheduler.submit(scheduler.engine.job(request("C"))),
    ]
    with pytest.raises(ResourceExhausted) as refused:
        scheduler.submit(scheduler.engine.job(request("A")))
    assert refused.value.retry_after_s > 0
    assert scheduler.stats().rejected == 1 and scheduler.stats().queued == 2
    with pytest.raises(InvalidArgument):  # bad requests fail at submit, before queueing
        scheduler.submit(scheduler.engine.job(GenerateRequest("", steps=1)))
    turnstile.release(3)
    for future in [running, *waiting]:
        future.result(timeout=60)
    assert scheduler.stats().completed == 3


def test_cancel_stops_within_one_step_and_frees_the_slot(gated):
    _, turnstile, start = gated
    scheduler = start(max_queue=1, max_group_skips=4)
    cancel = threading.Event()
    steps: list[int] = []

    def on_progress(progress) -> None:
        if progress.stage == "step":
            steps.append(progress.step)
            if progress.step == 3:
                cancel.set()

    turnstile.release()
    future = scheduler.submit(
        scheduler.engine.job(request("A", steps=12)), on_progress=on_progress, cancel=cancel
    )
    with pytest.raises(Cancelled):
        future.result(timeout=60)
    assert steps == [1, 2, 3]
    turnstile.release()
    assert (
        scheduler.submit(scheduler.engine.job(request("B"))).result(timeout=60).images
    )  # the slot is free again
    assert scheduler.stats().cancelled == 1


def test_deadline_stops_within_one_step(micro_pipeline, micro_adapters):
    step_s = 0.15
    engine = make_engine(micro_pipeline, "micro", micro_adapters, before_step=lambda i, n: time.sleep(step_s))
    scheduler = Scheduler(engine, max_queue=4, max_group_skips=4)
    stamps: list[float] = []
    deadline = time.monotonic() + 4 * step_s
    future = scheduler.submit(
        scheduler.engine.job(request("A", steps=30, deadline=deadline)),
        on_progress=lambda p: stamps.append(time.monotonic()) if p.stage == "step" else None,
    )
    with pytest.raises(DeadlineExceeded):
        future.result(timeout=60)
    failed_at = time.monotonic()
    assert len(stamps) < 30
    # every step that finished started before the deadline: the check runs before each step
    assert all(stamp - step_s < deadline + 0.05 for stamp in stamps[:-1])
    assert failed_at - deadline < 5.0
    expired = scheduler.submit(scheduler.engine.job(request("B", deadline=time.monotonic() - 1)))
    with pytest.raises(DeadlineExceeded):
        expired.result(timeout=60)
    scheduler.close(drain=True, timeout=10)


def test_cancel_while_queued_and_progress_events(gated):
    _, turnstile, start = gated
    scheduler = start(max_queue=8, max_group_skips=4)
    first_events: list = []
    first = scheduler.submit(
        scheduler.engine.job(request("A", steps=2, preview_every=1)), on_progress=first_events.append
    )
    turnstile.wait_entered()
    cancel = threading.Event()
    events: list = []
    queued = scheduler.submit(scheduler.engine.job(request("B")), on_progress=events.append, cancel=cancel)
    dropped = scheduler.submit(scheduler.engine.job(request("C")))
    assert dropped.cancel()
    cancel.set()
    turnstile.release(3)
    with pytest.raises(Cancelled):
        queued.result(timeout=60)
    result = first.result(timeout=60)
    assert result.images
    assert [e.stage for e in events] == ["queued"] and events[0].queue_position == 1
    steps = [e for e in first_events if e.stage == "step"]
    assert [(e.step, e.total_steps) for e in steps] == [(1, 2), (2, 2)]
    # 64 px on the longer side, or the image's own size (32 px on micro) when smaller; its seed
    assert all(e.preview is not None and e.preview.size == (32, 32) for e in steps)
    assert all(e.seed == result.parameters.seed for e in steps)
    assert first_events[0].stage == "queued" and first_events[0].queue_position == 0


def test_close_without_drain_fails_what_is_left(gated):
    _, turnstile, start = gated
    scheduler = start(max_queue=8, max_group_skips=4)
    running = scheduler.submit(scheduler.engine.job(request("A", steps=3)))
    turnstile.wait_entered()
    waiting = scheduler.submit(scheduler.engine.job(request("B")))
    closer = threading.Thread(target=scheduler.close, kwargs={"drain": False, "timeout": 30})
    closer.start()
    with pytest.raises(Unavailable):
        waiting.result(timeout=30)
    turnstile.release()
    with pytest.raises(Unavailable):
        running.result(timeout=30)
    closer.join(30)
    with pytest.raises(Unavailable):
        scheduler.submit(scheduler.engine.job(request("A")))


def test_close_with_drain_finishes_the_queue(gated):
    _, turnstile, start = gated
    scheduler = start(max_queue=8, max_group_skips=4)
    futures = [scheduler.submit(scheduler.engine.job(request("A")))]
    turnstile.wait_entered()
    futures.append(scheduler.submit(scheduler.engine.job(request("B"))))
    closer = threading.Thread(target=scheduler.close, kwargs={"drain": True, "timeout": 30})
    closer.start()
    turnstile.release(2)
    closer.join(30)
    assert all(f.result(timeout=1).images for f in futures)


def test_batches_share_a_loop_and_match_unbatched_images(gated, micro_pipeline, micro_adapters):
    _, turnstile, start = gated
    scheduler = start(max_queue=16, max_group_skips=4, max_batch=3)
    futures = [scheduler.submit(scheduler.engine.job(request("A", seed=0, steps=3)))]
    turnstile.wait_entered()
    cancel = threading.Event()

    def cancel_at_two(progress) -> None:
        if progress.stage == "step" and progress.step == 2:
            cancel.set()

    futures += [scheduler.submit(scheduler.engine.job(request("A", seed=seed, steps=3))) for seed in (1, 2)]
    doomed = scheduler.submit(
        scheduler.engine.job(request("A", seed=9, steps=3)), on_progress=cancel_at_two, cancel=cancel
    )
    futures.append(scheduler.submit(scheduler.engine.job(request("A", seed=3, steps=3, num_images=2))))
    other_shape = scheduler.submit(scheduler.engine.job(request("A", seed=4, steps=2)))
    turnstile.release(4)
    results = [future.result(timeout=60) for future in futures]
    with pytest.raises(Cancelled):
        doomed.result(timeout=60)
    assert other_shape.result(timeout=60).images
    # seeds 1 and 2 and the doomed request ran as one batch: one loop, one timing
    assert results[1].timings.denoise_ms == results[2].timings.denoise_ms != results[0].timings.denoise_ms
    assert results[3].parameters.seeds == (3, 4) and len(results[3].images) == 2

    alone = make_engine(micro_pipeline, "micro", micro_adapters)
    for result in results:
        solo = alone.generate(
            request("A", seed=result.parameters.seed, steps=3, num_images=result.parameters.num_images)
        )
        assert solo.blend_signature == result.blend_signature
        for batched, single in zip(result.images, solo.images, strict=True):
            difference = np.abs(np.asarray(batched, dtype=np.int16) - np.asarray(single, dtype=np.int16))
            assert difference.max() <= 1  # equal up to 8-bit rounding of ~1e-6 differences


def test_the_retry_hint_is_when_a_slot_frees_not_a_seeded_average(micro_pipeline, micro_adapters):
    """A slow first request (4 s: compilation, a cold cache) must not inflate the hint: a full
    queue of ~0.5 s requests answers about the running one's remaining time."""
    costs = {"first": True}

    def steps(index: int, total: int) -> None:
        if costs["first"]:
            costs["first"] = False
            time.sleep(4.0)
        time.sleep(0.1)

    engine = make_engine(micro_pipeline, "micro", micro_adapters, before_step=steps)
    scheduler = Scheduler(engine, max_queue=3)
    try:
        scheduler.submit(engine.job(request("A", steps=5))).result(60)  # the slow first one
        for seed in range(3):
            scheduler.submit(engine.job(request("A", seed=seed, steps=5))).result(60)
        running = scheduler.submit(engine.job(request("A", steps=5)))
        time.sleep(0.1)
        queued = [scheduler.submit(engine.job(request("B", seed=s, steps=5))) for s in range(3)]
        with pytest.raises(ResourceExhausted) as refused:
            scheduler.submit(engine.job(request("A", steps=5)))
        # The running request has < 0.5 s left; an average seeded by the first would say 5+ s.
        assert 0.5 <= refused.value.retry_after_s <= 1.0, refused.value.retry_after_s
        for future in [running, *queued]:
            future.result(60)
    finally:
        scheduler.close(drain=False, timeout=10)
