"""Faults a client must see mapped, not as INTERNAL: out of memory, and readiness after repeated OOMs."""

from __future__ import annotations

import time

import pytest
import torch

from adapters import errors
from tests.api.helpers import StepSeam, micro_config


@pytest.fixture(scope="module")
def oom_server(tmp_path_factory):
    from server.api.app import ServerThread
    from server.bootstrap import build_service

    seam = StepSeam()
    config = micro_config(tmp_path_factory.mktemp("home"), oom_unready_after=2, max_queue=4)
    with ServerThread(config, lambda cfg: build_service(cfg, before_step=seam)) as running:
        yield running, seam


def test_out_of_memory_is_resource_exhausted_then_not_ready_until_a_success(oom_server):
    from server.client import Client

    running, seam = oom_server
    with Client(running.address, timeout=60) as client:
        seam.fail_with = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        with pytest.raises(errors.ResourceExhausted, match="ran out of memory") as caught:
            client.generate("a fox", steps=1)
        assert caught.value.retry_after_s > 0
        assert client.health() == "SERVING"  # one OOM: still ready
        with pytest.raises(errors.ResourceExhausted):
            client.generate("a fox", steps=1)
        assert _health_becomes(client, "NOT_SERVING")  # two in a row: traffic should go elsewhere
        assert client.health("") == "SERVING"  # liveness is untouched: no restart
        seam.fail_with = None
        assert client.generate("a fox", steps=1).images  # calls are still accepted
        assert _health_becomes(client, "SERVING")


def _health_becomes(client, status: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.health() == status:
            return True
        time.sleep(0.02)
    return False


def test_a_huge_prompt_is_refused_at_once_and_others_are_served(client_of_running):
    """A 4 MiB prompt used to hold the engine for 13-23 s; now it is INVALID_ARGUMENT before any work."""
    client = client_of_running
    started = time.monotonic()
    with pytest.raises(errors.InvalidArgument, match="prompt is 4194304 bytes; at most 16384"):
        client.generate("a" * (4 << 20), steps=1)
    assert time.monotonic() - started < 2.0
    with pytest.raises(errors.InvalidArgument, match="negative_prompt"):
        client.generate("a fox", negative_prompt="b" * 20000, steps=1)
    assert client.generate("a fox", steps=1).images


@pytest.fixture()
def client_of_running(running):
    from server.client import Client

    with Client(running.address, timeout=60) as client:
        yield client
