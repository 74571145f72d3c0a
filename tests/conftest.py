"""Shared fixtures: tiny SD pipelines built locally from a fixed seed (no network)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests run the same examples on every run (derandomize: no flaky CI, no example
# database to carry around), with no per-example deadline (a busy 2-core machine is slow at
# times) and a fixed example count; a test that needs more or fewer says so with @settings.
settings.register_profile(
    "loraloom",
    derandomize=True,
    deadline=None,
    max_examples=100,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("loraloom")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: small models run faster so, above all on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def micro_pipeline():
    """The 32 px factory model; treat as read-only (copy before changing weights)."""
    from server.models.factory import build_pipeline

    return build_pipeline("micro", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The 64 px factory model; treat as read-only (copy before changing weights)."""
    from server.models.factory import build_pipeline

    return build_pipeline("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline():
    """The 64 px SDXL-topology factory model (two text encoders); treat as read-only."""
    from server.models.factory import build_pipeline

    return build_pipeline("tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_pipeline():
    """The 64 px SD 2.x-topology factory model (v-prediction); treat as read-only."""
    from server.models.factory import build_pipeline

    return build_pipeline("tiny-sd2", seed=0)


@pytest.fixture()
def loraloom_home(tmp_path, monkeypatch):
    """A private data folder for the test (store, caches)."""
    home = tmp_path / "home"
    monkeypatch.setenv("LORALOOM_HOME", str(home))
    return home
