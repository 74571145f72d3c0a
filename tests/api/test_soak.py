"""A bounded soak on loopback: client threads offer 1.5x the server's capacity for a while.

What must hold under overload, for good: every answer is OK or RESOURCE_EXHAUSTED (never
INTERNAL or UNKNOWN); each rejection carries the retry hint trailers; the queue never holds
more than its capacity; an admitted request's latency is bounded by the queue ahead of it;
the server keeps working at capacity; its memory does not drift; it is SERVING afterwards.

The capacity is measured first with a few requests. Each denoising step also sleeps a little
(the engine's before_step seam), so that the service time is dominated by the engine worker
and not by the client threads' Python, which share this process's two cores.
"""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.api.pb.loraloom.v1 import generate_pb2, server_pb2, service_pb2_grpc
from server.api.pb.loraloom.v1.adapters_pb2 import UploadAdapterRequest, UploadMetadata
from server.settings import SchedulerSettings
from server.wire import RETRY_AFTER_KEY, RETRY_PUSHBACK_KEY
from tests.api.helpers import StepSeam, adapter_bytes, micro_config
from tests.memory import rss_bytes

pytestmark = pytest.mark.slow

MAX_QUEUE = 4
STEPS = 3
STEP_DELAY_S = 0.03
LOAD_FACTOR = 1.5
CLIENTS = 12
SOAK_S = 40.0
WARMUP_S = 10.0  # of the soak: RSS drift is measured from its end
MAX_RSS_DRIFT = 0.05
MAX_GROUP_SKIPS = SchedulerSettings.max_group_skips  # the default scheduler, as served
# In service times, what an admitted request waits for and then runs. In order (FIFO): the running
# request, at most MAX_QUEUE - 1 queued ahead of it, itself. At worst, as the scheduler groups
# requests by blend: the running one, MAX_GROUP_SKIPS runs of other blends that pass it (each of
# at most MAX_QUEUE - 1 requests), its own run (at most MAX_QUEUE - 1 before it), itself.
FIFO_SERVICES = MAX_QUEUE + 1
WORST_SERVICES = (MAX_GROUP_SKIPS + 1) * (MAX_QUEUE - 1) + 2
# Times the measured service time: 1.5x for the CPU the client threads take, plus the RPC itself.
LATENCY_SLACK, LATENCY_OVERHEAD_S = 1.5, 0.25


@dataclass
class Outcome:
    sent: float
    latency_s: float
    code: grpc.StatusCode
    trailers: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory, micro_shapes, one_thread):
    from server.api.app import ServerThread
    from server.bootstrap import build_service

    seam = StepSeam(delay_s=STEP_DELAY_S)
    config = micro_config(tmp_path_factory.mktemp("soak"), max_queue=MAX_QUEUE)
    with ServerThread(config, lambda cfg: build_service(cfg, before_step=seam)) as thread:
        seam.delay_s = STEP_DELAY_S  # the warm-up ran at full speed
        with grpc.insecure_channel(thread.address) as channel:
            stub = service_pb2_grpc.LoraloomStub(channel)
            for name, seed in (("ink", 1), ("neon", 2)):
                data = adapter_bytes(micro_shapes, seed=seed)
                meta = UploadMetadata(
                    name=name, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
                )
                stub.UploadAdapter(
                    iter([UploadAdapterRequest(metadata=meta), UploadAdapterRequest(chunk=data)])
                )
            yield thread, stub, health_pb2_grpc.HealthStub(channel)


def request(index: int) -> generate_pb2.GenerateRequest:
    """Requests of three blends (the base, ink, neon), so runs of one blend and swaps alternate."""
    blend = [[], [generate_pb2.AdapterSpec(ref="ink", weight=0.7)], [generate_pb2.AdapterSpec(ref="neon")]]
    return generate_pb2.GenerateRequest(prompt="soak", steps=STEPS, seed=index, adapters=blend[index % 3])


def test_overload_is_shed_with_retry_hints_and_bounded_latency(soak_server):
    _, stub, health = soak_server
    # Capacity: a few requests one at a time (after two to warm the blends up).
    for index in range(3):
        stub.Generate(request(index), timeout=30)
    times = []
    for index in range(6):
        started = time.perf_counter()
        stub.Generate(request(index), timeout=30)
        times.append(time.perf_counter() - started)
    service_s = statistics.median(times)
    rate = LOAD_FACTOR / service_s  # requests per second offered, all clients together
    typical_bound = FIFO_SERVICES * service_s * LATENCY_SLACK + LATENCY_OVERHEAD_S
    worst_bound = WORST_SERVICES * service_s * LATENCY_SLACK + LATENCY_OVERHEAD_S

    outcomes: list[Outcome] = []
    depth: list[tuple[int, int]] = []
    memory: dict[str, int] = {}
    lock = threading.Lock()
    begin = time.perf_counter() + 0.2
    end = begin + SOAK_S

    def client(number: int) -> None:
        for index in range(number, 1 << 30, CLIENTS):
            slot = begin + index / rate  # open loop: each client keeps its own schedule
            if slot >= end or time.perf_counter() >= end:
                return
            time.sleep(max(0.0, slot - time.perf_counter()))
            sent = time.perf_counter()
            try:
                stub.Generate(request(index), timeout=30)
                outcome = Outcome(sent, time.perf_counter() - sent, grpc.StatusCode.OK)
            except grpc.RpcError as error:
                trailers = dict(error.trailing_metadata() or ())
                outcome = Outcome(sent, time.perf_counter() - sent, error.code(), trailers)
            with lock:
                outcomes.append(outcome)

    def monitor() -> None:
        while time.perf_counter() < end:
            queue = stub.GetServerInfo(server_pb2.GetServerInfoRequest(), timeout=10).queue
            depth.append((queue.queued, queue.running))
            if "warm" not in memory and time.perf_counter() >= begin + WARMUP_S:
                memory["warm"] = rss_bytes()
            time.sleep(0.05)
        memory["end"] = rss_bytes()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    threads.append(threading.Thread(target=monitor))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SOAK_S + 60)
    elapsed = time.perf_counter() - begin

    codes = {outcome.code for outcome in outcomes}
    admitted = [o for o in outcomes if o.code is grpc.StatusCode.OK]
    rejected = [o for o in outcomes if o.code is grpc.StatusCode.RESOURCE_EXHAUSTED]
    summary = (
        f"service {service_s * 1000:.0f} ms, offered {rate:.1f}/s for {SOAK_S:.0f}s: {len(outcomes)} sent, "
        f"{len(admitted)} admitted, {len(rejected)} rejected, codes {sorted(c.name for c in codes)}"
    )
    # Every answer is a defined one: served, or shed with a hint.
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, summary
    assert rejected and len(admitted) >= len(outcomes) // 3, summary
    for outcome in rejected:
        hint = float(outcome.trailers[RETRY_AFTER_KEY])
        assert 0 < hint <= 60 and int(outcome.trailers[RETRY_PUSHBACK_KEY]) == round(hint * 1000), summary
    # The queue never holds more than it may; one request runs at a time.
    assert depth and max(q for q, _ in depth) <= MAX_QUEUE and max(r for _, r in depth) <= 1, summary
    # Admitted requests wait for the queue ahead of them, no more: the median as in FIFO order,
    # the 99th percentile within what grouping by blend may add.
    latencies = sorted(o.latency_s for o in admitted)
    p50, p99 = latencies[len(latencies) // 2], latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    assert p50 <= typical_bound, f"p50 {p50:.2f}s > {typical_bound:.2f}s; {summary}"
    assert p99 <= worst_bound, f"p99 {p99:.2f}s > {worst_bound:.2f}s; {summary}"
    # Overloaded, the server keeps serving at (about) its capacity.
    assert len(admitted) / elapsed >= 0.7 / service_s, summary
    # Its memory holds steady after the warm-up.
    drift = (memory["end"] - memory["warm"]) / memory["warm"]
    assert drift < MAX_RSS_DRIFT, f"RSS {memory['warm'] >> 20} -> {memory['end'] >> 20} MiB; {summary}"

    deadline = time.monotonic() + 30
    while stub.GetServerInfo(server_pb2.GetServerInfoRequest(), timeout=10).queue.queued:
        assert time.monotonic() < deadline, "the queue did not drain"
        time.sleep(0.1)
    answer = health.Check(health_pb2.HealthCheckRequest(service="loraloom.v1.Loraloom"), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
