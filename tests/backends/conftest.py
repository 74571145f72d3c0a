"""Backend fixtures: private copies of the tiny model, an export folder shared by the session."""

from __future__ import annotations

import copy

import pytest

from adapters.canonical import LoraAdapter
from server.engine.synthetic import random_adapter
from server.models.shapes import module_shapes


@pytest.fixture(scope="session")
def export_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture()
def own_tiny(tiny_pipeline):
    own = copy.deepcopy(tiny_pipeline)
    for component in ("unet", "text_encoder", "vae"):
        getattr(own, component).requires_grad_(False).eval()
    return own


def unet_adapters(pipeline) -> dict[str, LoraAdapter]:
    """Two UNet adapters: attention projections, and one that also touches convolutions."""
    shapes = module_shapes(pipeline)
    unet_shapes = {key: shape for key, shape in shapes.items() if key.startswith("unet.")}
    convs = sorted(key for key, shape in unet_shapes.items() if len(shape) == 4)[:3]
    first = random_adapter(unet_shapes, seed=1, rank=4, strength=0.3)
    extra = random_adapter(unet_shapes, seed=2, rank=3, targets=convs, strength=0.3)
    second = random_adapter(unet_shapes, seed=3, rank=6, strength=0.3)
    return {"a": first, "b": LoraAdapter(modules={**second.modules, **extra.modules})}


@pytest.fixture(autouse=True, scope="module")
def _on_one_thread(one_thread):
    """Every test here runs torch on one thread (the shared ``one_thread`` fixture)."""


@pytest.fixture(scope="module")
def ov_home(tmp_path_factory):
    """One data folder per module: exports, conversions and compiled blobs are made once."""
    return tmp_path_factory.mktemp("ov-home")


@pytest.fixture()
def in_ov_home(ov_home, monkeypatch):
    """``LORALOOM_HOME`` is the module's data folder (modules opt in with ``usefixtures``)."""
    monkeypatch.setenv("LORALOOM_HOME", str(ov_home))
