"""A real loraloom server on 127.0.0.1:0 (micro model, private store) for the API tests."""

from __future__ import annotations

import pytest

from tests.api.helpers import StepSeam, micro_config


@pytest.fixture(scope="module")
def seam():
    return StepSeam()


@pytest.fixture(scope="module")
def running(tmp_path_factory, seam):
    """One in-process server for the module (micro model, max_queue 2, 700-byte image chunks)."""
    from server.api.app import ServerThread
    from server.bootstrap import build_service

    config = micro_config(tmp_path_factory.mktemp("home"))
    thread = ServerThread(config, lambda cfg: build_service(cfg, before_step=seam))
    with thread:
        yield thread


@pytest.fixture()
def client(running, seam):
    from server.client import Client

    seam.reset()
    with Client(running.address, timeout=60) as connected:
        yield connected
    seam.reset()


@pytest.fixture(scope="session")
def micro_shapes(micro_pipeline):
    from server.models.shapes import module_shapes

    return module_shapes(micro_pipeline)
