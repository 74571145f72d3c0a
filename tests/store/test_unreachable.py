"""An unreachable database is StoreUnreachable (UNAVAILABLE: retry), never a raw SQLAlchemy error.

PostgreSQL is stopped for real: each test that does so gets a dedicated throwaway cluster
(``pgcluster.py``), so the session's shared one is never disturbed.
"""

from __future__ import annotations

import logging
import sqlite3

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from adapters.errors import StoreUnreachable, Unavailable
from adapters.store import AdapterStore, LocalBlobStorage, db, make_validator
from tests.store.conftest import MICRO_BASE
from tests.store.pgcluster import bindir_or_skip, throwaway_cluster


@pytest.fixture()
def outage_cluster():
    """A PostgreSQL cluster of this test's own, to stop and start again."""
    with throwaway_cluster(bindir_or_skip()) as cluster:
        yield cluster


def _open(url, tmp_path, micro_shapes) -> AdapterStore:
    return AdapterStore(
        url,
        LocalBlobStorage(tmp_path / "blobs"),
        staging_dir=tmp_path / "staging",
        validator=make_validator(micro_shapes, MICRO_BASE),
    )


@pytest.mark.postgres
def test_store_calls_answer_unavailable_while_postgresql_is_down(
    outage_cluster, tmp_path, micro_shapes, lora, caplog
):
    store = _open(outage_cluster.url, tmp_path, micro_shapes)
    try:
        ink = store.register("ink", lora(seed=1))
        outage_cluster.stop()  # its pooled connections are cut (fast shutdown keeps committed data)
        calls = {
            "get": lambda: store.get("ink"),
            "resolve": lambda: store.resolve(["ink", "ink@1"]),
            "list": lambda: store.list(),
            "register": lambda: store.register("neon", lora(seed=2)),
            "set_alias": lambda: store.set_alias("ink", "stable", 1),
            "delete": lambda: store.delete("ink"),
            "verify": lambda: store.verify(),
        }
        with caplog.at_level(logging.WARNING, logger="adapters.store.db"):
            for name, call in calls.items():
                with pytest.raises(StoreUnreachable, match="database is unreachable.*retry") as caught:
                    call()
                assert isinstance(caught.value, Unavailable) and caught.value.code == "UNAVAILABLE", name
                assert caught.value.__cause__ is not None  # the details stay for the server's log
            assert bytes(store.read_blob(ink)) == lora(seed=1)  # blobs need no database
            outage_cluster.start()
            assert store.get("ink").sha256 == ink.sha256  # the pool reconnects by itself
            assert store.register("neon", lora(seed=2)).ref == "neon@1"
        messages = [record.getMessage() for record in caplog.records]
        assert len(messages) == 2, messages  # once per outage, once when it is over
        assert (
            "unreachable" in messages[0] and "127.0.0.1" in messages[0] and "reachable again" in messages[1]
        )
    finally:
        store.close()


@pytest.mark.postgres
def test_opening_a_store_whose_database_is_down_is_unavailable(outage_cluster, tmp_path, micro_shapes):
    outage_cluster.stop()
    with pytest.raises(StoreUnreachable):
        _open(outage_cluster.url, tmp_path, micro_shapes)


def _operational(message: str, orig: Exception) -> OperationalError:
    return OperationalError("SELECT 1", {}, orig)


class _PgError(Exception):
    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "unreachable"),
    [
        (_operational("x", sqlite3.OperationalError("database is locked")), True),
        (_operational("x", sqlite3.OperationalError("unable to open database file")), True),
        (_operational("x", sqlite3.OperationalError("disk I/O error")), True),
        (_operational("x", sqlite3.OperationalError("no such table: versions")), False),
        (_operational("x", _PgError("connection refused", None)), True),
        (_operational("x", _PgError("terminating connection due to administrator command", "57P01")), True),
        (_operational("x", _PgError("connection failure", "08006")), True),
        (_operational("x", _PgError("canceling statement due to statement timeout", "57014")), False),
        (IntegrityError("x", {}, sqlite3.IntegrityError("UNIQUE constraint failed")), False),
        (PoolTimeout("QueuePool limit reached"), True),
        (ValueError("not a database error"), False),
    ],
    ids=lambda value: value if isinstance(value, bool) else str(getattr(value, "orig", value))[:40],
)
def test_which_database_errors_mean_unreachable(error, unreachable):
    assert db.is_unreachable(error) is unreachable


def test_a_schema_fault_stays_an_error_not_unavailable(store):
    """A missing table is a bug (INTERNAL), not an outage to retry."""
    cascade = " CASCADE" if store.backend == "postgresql" else ""
    with store.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE adapters{cascade}"))
    with pytest.raises(DBAPIError):
        store.get("anything")
