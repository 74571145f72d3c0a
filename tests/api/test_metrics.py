"""Prometheus endpoint and structured request logs, scraped and read after real requests."""

from __future__ import annotations

import json
import logging
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters import errors
from server.api.logging import JsonFormatter, TextFormatter, prompt_digest
from server.client import Client
from server.client.errors import ServerError
from tests.api.helpers import adapter_bytes, micro_config

PROMPT = "a secret red circle"


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    from server.api.app import ServerThread

    config = micro_config(
        tmp_path_factory.mktemp("home"), metrics_port=0, cache_mb=1, tokens="tok generate,manage"
    )
    with ServerThread(config) as running:
        yield running


def scrape(running) -> dict[tuple[str, tuple], float]:
    port = running.server.metrics.port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_real_requests(metered, micro_shapes, caplog):
    before = scrape(metered)
    assert value(before, "loraloom_queue_depth") == 0
    with Client(metered.address, timeout=60, token="tok") as client:
        client.upload_adapter(adapter_bytes(micro_shapes, seed=1, rank=32), "big-a")
        client.upload_adapter(adapter_bytes(micro_shapes, seed=2, rank=32), "big-b")
        client.upload_adapter(adapter_bytes(micro_shapes, seed=3, rank=32), "big-c")
        # Two of these fit the 1 MiB cache, three do not: miss, hit (a new blend of a), two misses
        # (c evicts a), then a blend whose plan is cached (written from it: no adapter is read).
        with caplog.at_level(logging.INFO, logger="loraloom.requests"):
            for names, weight in (
                (["big-a"], 0.7),
                (["big-a"], 0.5),
                (["big-b", "big-c"], 0.7),
                (["big-a"], 0.7),
            ):
                blend = [f"{name}:{weight}" for name in names]
                client.generate(PROMPT, adapters=blend, steps=1, seed=5, request_id=f"req-{names[0]}")
        with pytest.raises(errors.NotFound):
            client.generate(PROMPT, adapters=["nobody:1"], steps=1)
    with Client(metered.address, timeout=10, token="wrong") as bad, pytest.raises(ServerError) as caught:
        bad.server_info()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED

    # an aborted call's status can reach the client a moment before the interceptor counts it
    deadline = time.monotonic() + 10
    while True:
        after = scrape(metered)
        counted = value(after, "loraloom_request_duration_seconds_count", method="GetServerInfo")
        if (counted and value(after, "loraloom_request_duration_seconds_count", method="Generate") == 5) or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(0.1)
    assert value(after, "loraloom_requests_total", method="Generate", code="OK") == 4
    assert value(after, "loraloom_requests_total", method="Generate", code="NOT_FOUND") == 1
    assert value(after, "loraloom_requests_total", method="UploadAdapter", code="OK") == 3
    assert value(after, "loraloom_requests_total", method="GetServerInfo", code="UNAUTHENTICATED") == 1
    assert value(after, "loraloom_request_duration_seconds_count", method="Generate") == 5
    assert value(after, "loraloom_request_duration_seconds_sum", method="Generate") > 0
    assert value(after, "loraloom_queue_wait_seconds_count") == 4
    assert value(after, "loraloom_swap_duration_seconds_count") >= 3
    assert value(after, "loraloom_swaps_total") >= 3 and value(after, "loraloom_swap_seconds_total") > 0
    assert value(after, "loraloom_adapter_cache_hits_total") >= 1
    assert value(after, "loraloom_adapter_cache_misses_total") >= 3
    assert value(after, "loraloom_adapter_cache_evictions_total") >= 1
    assert (
        0
        < value(after, "loraloom_adapter_cache_bytes")
        <= value(after, "loraloom_adapter_cache_capacity_bytes")
    )
    assert value(after, "loraloom_adapter_requests_total", adapter="big-a") == 3
    assert value(after, "loraloom_adapter_requests_total", adapter="big-b") == 1
    assert ("loraloom_adapter_requests_total", (("adapter", "nobody"),)) not in after  # failed: no series
    assert ("loraloom_queue_depth", ()) in after and ("loraloom_requests_running", ()) in after

    records = [record for record in caplog.records if record.name == "loraloom.requests"]
    assert len(records) == 4
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == "req-big-a" and line["seed"] == 5 and line["blend_signature"]
    assert line["prompt_sha256"] == prompt_digest(PROMPT) and line["message"] == "generated"
    assert all(PROMPT not in JsonFormatter().format(record) for record in records)
    text = TextFormatter().format(records[0])  # the default format carries the same fields
    assert "generated request_id=req-big-a" in text and "seed=5" in text and "status=OK" in text
    assert all(PROMPT not in TextFormatter().format(record) for record in records)
    forged = logging.makeLogRecord({"msg": "generated", "prompt": 'a cat\nERROR x=1 "y"', "adapters": []})
    (line,) = TextFormatter().format(forged).splitlines()  # quoted: no second line, no bare x=1
    assert 'prompt="a cat\\nERROR x=1 \\"y\\""' in line and 'adapters=""' in line


def _series(samples, name: str) -> set[tuple]:
    return {labels for sample, labels in samples if sample == name}


def test_client_strings_never_become_label_values(metered, micro_shapes):
    """150 calls with unknown or malformed adapter names: no new series anywhere; the
    per-adapter counter counts only what a successful generation applied."""
    with Client(metered.address, timeout=60, token="tok") as client:
        client.upload_adapter(adapter_bytes(micro_shapes, seed=7), "known")
        client.generate(PROMPT, adapters=["known:0.5"], steps=1, seed=1)
        before = scrape(metered)
        for index in range(150):
            ref = f"ghost-{index}" if index % 3 else f"Not A Name {index}!"
            with pytest.raises((errors.NotFound, errors.InvalidArgument)):
                client.generate(PROMPT, adapters=[f"{ref}:0.5"], steps=1)
        with pytest.raises(errors.NotFound):
            client.generate(PROMPT, adapters=["known@99:0.5"], steps=1)
    after = scrape(metered)
    assert {labels for _, labels in after} - {labels for _, labels in before} <= {
        (("code", "INVALID_ARGUMENT"), ("method", "Generate"))
    }
    adapters = _series(after, "loraloom_adapter_requests_total")
    assert all(dict(labels)["adapter"] in {"big-a", "big-b", "big-c", "known"} for labels in adapters), (
        adapters
    )
    assert value(after, "loraloom_adapter_requests_total", adapter="known") == 1


def test_per_adapter_series_are_capped():
    """The first N applied names get a series each for the server's life; later ones count
    under ``_other`` (which no adapter can be named)."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from server.api.metrics import OTHER_ADAPTERS, Metrics

    metrics = Metrics(max_adapter_series=3)

    def generated(*names: str):
        applied = [SimpleNamespace(name=name) for name in names]
        timings = SimpleNamespace(queue_ms=1.0, swap_ms=0.0)
        return SimpleNamespace(parameters=SimpleNamespace(adapters=applied), timings=timings)

    for names in (["a"], ["b", "a"], ["c"], ["d"], ["e", "a"], ["d"]):
        metrics.observe(SimpleNamespace(adapters=[]), generated(*names))
    metrics.observe(SimpleNamespace(adapters=[("f", 1.0)]), None, errors.NotFound("f"))
    counts = {
        sample.labels["adapter"]: sample.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for sample in family.samples
        if sample.name == "loraloom_adapter_requests_total"
    }
    assert counts == {"a": 3, "b": 1, "c": 1, OTHER_ADAPTERS: 3}
