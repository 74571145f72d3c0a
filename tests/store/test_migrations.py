"""Alembic migrations: they build exactly the tables the code uses, and concurrent first opens are safe."""

from __future__ import annotations

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from adapters.errors import FailedPrecondition
from adapters.store import db
from adapters.store.schema import metadata


def test_migrated_schema_matches_the_tables_in_code(store):
    assert db.current_revision(store.engine) == db.head_revision()
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    assert set(inspect(store.engine).get_table_names()) == {
        "adapters",
        "aliases",
        "alembic_version",
        "blobs",
        "version_tags",
        "versions",
    }


def test_concurrent_first_opens(make_store, lora):
    errors: list[BaseException] = []
    stores = []
    start = threading.Barrier(4)

    def open_one() -> None:
        try:
            start.wait()
            stores.append(make_store())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(stores) == 4
    assert all(db.current_revision(s.engine) == db.head_revision() for s in stores)
    v = stores[0].register("cat", lora())
    assert stores[3].get("cat") == v


def test_plain_postgresql_urls_use_psycopg_3():
    engine = db.make_engine("postgresql://user:secret@db.example:5432/loraloom")
    assert engine.dialect.driver == "psycopg"
    engine.dispose()


def test_a_database_from_a_newer_release_is_refused_clearly(make_store):
    store = make_store()
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    store.close()
    with pytest.raises(FailedPrecondition, match="newer loraloom"):
        make_store()


def test_upgrade_downgrade_upgrade(make_store, lora, db_url):
    """Every revision goes down and up again cleanly, one step at a time (SQLite and PostgreSQL):
    the schema then matches the code again and the store works; what a downgrade drops is gone."""
    store = make_store()
    store.register("cat", lora(seed=1), aliases=["stable"], tags=["x"])
    chain = [script.revision for script in db._scripts().walk_revisions()]  # newest first
    for revision, below in zip(chain, [*chain[1:], "base"], strict=True):
        assert db.current_revision(store.engine) == revision
        db.downgrade(store.engine, below)
    assert db.current_revision(store.engine) is None
    assert set(inspect(store.engine).get_table_names()) <= {"alembic_version"}
    for revision in reversed(chain):
        db.upgrade(store.engine, revision)
        assert db.current_revision(store.engine) == revision
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    assert store.list().items == ()
    again = store.register("cat", lora(seed=2), aliases=["stable"])
    assert again.version == 1 and store.get("cat@stable") == again
    store.close()
    assert make_store().get("cat").sha256 == again.sha256  # a later open finds the head in place
