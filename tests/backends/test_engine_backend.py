"""The engine on the ONNX Runtime backend: the torch engine's images, blend for blend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.errors import InvalidArgument
from server.engine import Engine, MemoryResolver
from server.engine.types import GenerateRequest
from tests.engine.conftest import base_from, engine_on

from .conftest import unet_adapters

PIXEL_TOLERANCE = 2  # of 255, max over the image (float32 kernel order, 4 steps)


def _engine(pipeline, backend: str, tmp_path, monkeypatch) -> Engine:
    monkeypatch.setenv("LORALOOM_HOME", str(tmp_path / "home"))
    resolver = MemoryResolver()
    for name, adapter in unet_adapters(pipeline).items():
        resolver.add_adapter(name, adapter)
    return engine_on(base_from(pipeline), backend, resolver=resolver)


def _image(engine: Engine, adapters) -> np.ndarray:
    request = GenerateRequest(prompt="a red square", steps=4, seed=5, adapters=list(adapters))
    return np.asarray(engine.generate(request).images[0], dtype=np.int16)


def test_onnxruntime_engine_gives_the_torch_engine_images(tiny_pipeline, tmp_path, monkeypatch):
    torch_engine = _engine(tiny_pipeline, "torch", tmp_path, monkeypatch)
    ort_engine = _engine(tiny_pipeline, "onnxruntime", tmp_path, monkeypatch)
    assert ort_engine.backend == "onnxruntime"
    images = {}
    for blend in ([("a", 1.0)], [("b", 0.8), ("a", -0.4)], [], [("a", 1.0)]):
        expected, got = _image(torch_engine, blend), _image(ort_engine, blend)
        assert np.abs(got - expected).max() <= PIXEL_TOLERANCE, blend
        images.setdefault(tuple(blend), []).append(got)
    # A -> B -> base -> A: A's image again (nothing of B leaked), and blends differ visibly.
    first, again = images[(("a", 1.0),)]
    assert np.array_equal(first, again)
    assert np.abs(first - images[()][0]).max() > 10 * PIXEL_TOLERANCE
    assert ort_engine.stats().swaps == 4


def test_unknown_or_unfit_backend_is_refused(tiny_pipeline):
    with pytest.raises(InvalidArgument, match="unknown backend"):
        engine_on(base_from(tiny_pipeline), "nope")
    with pytest.raises(InvalidArgument, match="float32 weights"):
        engine_on(base_from(tiny_pipeline, dtype=torch.float16), "onnxruntime")
