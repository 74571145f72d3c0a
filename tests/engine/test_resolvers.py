from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
from sqlalchemy import event

from adapters.errors import BlobDamaged, InvalidArgument, NotFound, StoreUnreachable, Unavailable
from adapters.formats import save_canonical, to_kohya
from adapters.store import AdapterStore
from server.engine import Engine, GenerateRequest, MemoryResolver, StoreResolver
from server.engine.scheduler import Scheduler
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
    assert resolver.resolve(["x", "x@1", "x@latest"]) == [two, one, two]
    assert one.sha256 != two.sha256
    for ref in ("y", "x@3", "x@stable"):
        with pytest.raises(NotFound):
            resolver.resolve([ref])
    with pytest.raises(InvalidArgument):
        resolver.add_adapter("bad@name", random_adapter(shapes, seed=3, targets=["unet.a"]))


class StatementCounter:
    """Counts the SQL statements a store sends (a SQLAlchemy event hook on its engine)."""

    def __init__(self, store: AdapterStore) -> None:
        self.statements: list[str] = []
        event.listen(store.engine, "before_cursor_execute", self._record)

    def _record(self, _conn, _cursor, statement, *_rest) -> None:
        self.statements.append(statement)

    def take(self) -> list[str]:
        taken, self.statements = self.statements, []
        return taken


@pytest.fixture()
def served(tmp_path, micro_pipeline, micro_adapters):
    """A store with two adapters, an engine resolving through it, and its scheduler."""
    with AdapterStore.open(tmp_path / "home") as store:
        store.register("ink", save_canonical(micro_adapters["ink"]), aliases=["stable"])
        store.register("neon", save_canonical(micro_adapters["neon"]))
        engine = Engine(base_from(micro_pipeline, "micro"), resolver=StoreResolver(store, ttl_s=60))
        scheduler = Scheduler(engine, max_queue=8)
        try:
            yield store, engine, scheduler
        finally:
            scheduler.close(drain=False, timeout=10)


def test_a_resident_blend_costs_one_statement_then_none(served):
    """Resolving a two-adapter blend is one SQL statement; a repeat within the TTL is none,
    and the engine worker never reads the store for it."""
    store, engine, scheduler = served
    blend = [("ink", 0.6), ("neon@1", 0.4)]
    scheduler.submit(engine.job(GenerateRequest("a fox", steps=1, seed=1, adapters=blend))).result(60)
    counter = StatementCounter(store)
    engine.resolver.invalidate()  # the adapters stay resident; only the names must be resolved again
    job = engine.job(GenerateRequest("a fox", steps=1, seed=2, adapters=blend))
    assert len(counter.take()) == 1
    scheduler.submit(job).result(60)
    assert counter.take() == []  # the worker ran it without the store
    scheduler.submit(engine.job(GenerateRequest("a fox", steps=1, seed=3, adapters=blend))).result(60)
    assert counter.take() == []


def test_an_alias_move_through_the_service_is_seen_at_once(served):
    store, engine, _ = served
    assert engine.resolve_blend([("ink@stable", 1.0)]).entries[0][0].version == 1
    store.register("ink", save_canonical(_other(engine)))
    store.set_alias("ink", "stable", 2)
    assert engine.resolve_blend([("ink@stable", 1.0)]).entries[0][0].version == 1  # cached (ttl 60 s)
    engine.resolver.invalidate("ink")  # what the service does after an upload, alias move or delete
    assert engine.resolve_blend([("ink@stable", 1.0)]).entries[0][0].version == 2


def _other(engine):
    from server.engine.synthetic import random_adapter
    from server.models.shapes import module_shapes

    return random_adapter(module_shapes(engine.pipeline), seed=77, rank=2, strength=0.1)


def test_a_name_and_its_exact_version_are_one_group_and_one_swap(served):
    """``ink`` and ``ink@1`` resolve to one sha256: the scheduler runs them as one blend."""
    _, engine, scheduler = served
    assert engine.job(GenerateRequest("x", adapters=[("ink", 1.0)])).blend.signature == (
        engine.job(GenerateRequest("x", adapters=[("ink@1", 1.0)])).blend.signature
    )
    gate = threading.Event()
    engine._before_step = lambda index, total: gate.wait(30)
    busy = scheduler.submit(engine.job(GenerateRequest("x", steps=1, seed=0, adapters=[("neon", 1.0)])))
    refs = ["ink", "ink@1", "ink@stable", "neon", "ink"]
    futures = [
        scheduler.submit(engine.job(GenerateRequest("x", steps=1, seed=i, adapters=[(ref, 1.0)])))
        for i, ref in enumerate(refs)
    ]
    swaps = engine.stats().swaps
    gate.set()
    results = [future.result(60) for future in futures]
    busy.result(60)
    signatures = [result.blend_signature for result in results]
    assert signatures[0] == signatures[1] == signatures[2] == signatures[4] != signatures[3]
    # neon (running) -> all four ink requests in one run -> neon: two swaps, not four.
    assert engine.stats().swaps - swaps == 2


class FlakyStore:
    """An AdapterStore whose database can be made unreachable (what a store raises then)."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self.down = False
        self.lookups = 0

    def resolve(self, refs):
        self.lookups += 1
        if self.down:
            raise StoreUnreachable("the adapter store's database is unreachable right now; retry")
        return self.store.resolve(refs)

    def load_version(self, version, module_names=None):
        return self.store.load_version(version, module_names)


@pytest.mark.parametrize("ttl_s", [1.0, 0.0])
def test_an_unreachable_store_is_answered_with_the_last_resolution(
    tmp_path, micro_pipeline, micro_adapters, caplog, ttl_s
):
    """Stale-if-error: expired (or never cached, ttl 0) resolutions are served while the store is
    down, logged once per outage; references never resolved fail UNAVAILABLE, not INTERNAL."""
    from server.models.shapes import module_shapes

    now = [0.0]
    with AdapterStore.open(tmp_path / "home") as store:
        store.register("ink", save_canonical(micro_adapters["ink"]))
        store.register("neon", save_canonical(micro_adapters["neon"]))
        flaky = FlakyStore(store)
        resolver = StoreResolver(flaky, ttl_s=ttl_s, clock=lambda: now[0])
        ink, neon = resolver.resolve(["ink", "neon@1"])

        flaky.down = True
        now[0] += 10.0  # past the TTL
        with caplog.at_level(logging.WARNING, logger="server.engine.resolvers"):
            for _ in range(3):
                assert resolver.resolve(["neon@1", "ink"]) == [neon, ink]
            for refs in (["ghost"], ["ink", "ghost"]):
                with pytest.raises(Unavailable, match="unreachable") as caught:
                    resolver.resolve(refs)
                assert caught.value.code == "UNAVAILABLE"
            # bytes come from the blob storage, not the database: a resolved adapter still loads
            assert resolver.resolve(["ink"])[0].load(module_shapes(micro_pipeline)).modules
            assert resolver.stale_served == 7 and resolver.outage
            flaky.down = False
            lookups = flaky.lookups
            assert resolver.resolve(["ink"]) == [ink]
            assert flaky.lookups == lookups + 1 and not resolver.outage
        warnings = [record.getMessage() for record in caplog.records]
        assert len(warnings) == 2, warnings
        assert "unreachable" in warnings[0] and "answers again" in warnings[1]


def test_a_damaged_blob_fails_its_requests_with_data_loss_and_spares_the_others(tmp_path, micro_pipeline):
    from server.engine.synthetic import random_adapter
    from server.models.shapes import module_shapes
    from tests.store.damage import overwrite_tensor_bytes

    shapes = module_shapes(micro_pipeline)
    with AdapterStore.open(tmp_path / "home") as store:
        damaged = store.register("ink", save_canonical(random_adapter(shapes, seed=1, rank=8)))
        store.register("neon", save_canonical(random_adapter(shapes, seed=2, rank=8)))
        overwrite_tensor_bytes(store.blobs.path(damaged.sha256), 0.25)
        engine = Engine(base_from(micro_pipeline, "micro"), resolver=StoreResolver(store))
        with pytest.raises(BlobDamaged, match="ink@1") as caught:
            engine.generate(GenerateRequest("a fox <lora:ink:0.5>", steps=1, seed=2))
        assert caught.value.code == "DATA_LOSS" and caught.value.reason == "sha256_mismatch"
        with pytest.raises(BlobDamaged):
            engine.load("ink")
        assert engine.generate(GenerateRequest("a fox <lora:neon:0.5>", steps=1, seed=2)).images
        assert store.load_failures.snapshot()["sha256_mismatch"] == 2
