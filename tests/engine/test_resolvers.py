from __future__ import annotations

import numpy as np
import pytest

from adapters.errors import InvalidArgument, NotFound
from adapters.formats import save_canonical, to_kohya
from adapters.store import AdapterStore
from server.engine import Engine, GenerateRequest, MemoryResolver, StoreResolver
from tests.engine.conftest import base_from


def test_engine_serves_from_the_store(tmp_path, micro_pipeline, micro_adapters):
    with AdapterStore.open(tmp_path / "home") as store:
        first = store.register("ink", save_canonical(micro_adapters["ink"]), aliases=["stable"])
        second = store.register("ink", to_kohya(micro_adapters["neon"]))
        engine = Engine(base_from(micro_pipeline, "micro"), resolver=StoreResolver(store))

        newest = engine.generate(GenerateRequest("a fox <lora:ink:0.5>", steps=1, seed=2))
        (applied,) = newest.parameters.adapters
        assert (applied.name, applied.version, applied.sha256) == ("ink", 2, second.sha256)
        pinned = engine.generate(GenerateRequest("a fox <lora:ink@stable:0.5>", steps=1, seed=2))
        assert pinned.parameters.adapters[0].sha256 == first.sha256
        assert not np.array_equal(np.asarray(newest.images[0]), np.asarray(pinned.images[0]))
        assert {(a.name, a.version) for a in engine.resident()} == {("ink", 1), ("ink", 2)}
        assert engine.unload("ink@stable") and [a.version for a in engine.resident()] == [2]
        with pytest.raises(NotFound):
            engine.load("ink@9")


def test_memory_resolver_versions():
    from server.engine.synthetic import random_adapter

    resolver = MemoryResolver()
    shapes = {"unet.a": (4, 4)}
    one = resolver.add_adapter("x", random_adapter(shapes, seed=1, targets=["unet.a"]))
    two = resolver.add_adapter("x", random_adapter(shapes, seed=2, targets=["unet.a"]))
    assert (
        resolver.resolve("x") == two
        and resolver.resolve("x@1") == one
        and resolver.resolve("x@latest") == two
    )
    assert one.sha256 != two.sha256
    for ref in ("y", "x@3", "x@stable"):
        with pytest.raises(NotFound):
            resolver.resolve(ref)
    with pytest.raises(InvalidArgument):
        resolver.add_adapter("bad@name", random_adapter(shapes, seed=3, targets=["unet.a"]))
