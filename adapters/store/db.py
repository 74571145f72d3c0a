"""The metadata database: engines for SQLite and PostgreSQL, schema upgrades, retried transactions,
and the one place that tells "the database cannot be reached" from a fault (``Reachability``).

SQLite: WAL journal, foreign keys on, and every transaction is ``BEGIN
IMMEDIATE`` so writers queue on the busy timeout instead of failing half way
(a deferred transaction that upgrades to a write lock fails at once in WAL
mode). PostgreSQL: READ COMMITTED; row locks order competing writers, and a
transaction-scoped advisory lock serializes concurrent first opens.

Unreachable: connection failures, disconnects (``OperationalError``,
``InterfaceError``, any DBAPI error that invalidated its connection), an
exhausted pool, and on SQLite a file that cannot be opened, read or locked in
time become ``adapters.errors.StoreUnreachable`` (gRPC UNAVAILABLE: retry), never
INTERNAL; every other database error stays what it is (a bug, INTERNAL).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from adapters.errors import FailedPrecondition, InvalidArgument, StoreUnreachable

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
SUPPORTED_BACKENDS = ("sqlite", "postgresql")
BUSY_TIMEOUT_S = 60.0
# pg_advisory_xact_lock key for schema upgrades: "lorastor" as a big-endian int64.
_SCHEMA_LOCK_KEY = int.from_bytes(b"lorastor", "big") & (2**63 - 1)

READ_ONLY_OPTION = "loraloom_read_only"
# One SELECT needs no transaction around it (a statement reads one snapshot on both backends).
SINGLE_READ_OPTION = "loraloom_single_read"

T = TypeVar("T")


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).absolute()}"


def backend_of(url: str) -> str:
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        raise InvalidArgument(
            f"invalid database URL {url!r}: use sqlite:////path/to/store.db or "
            "postgresql+psycopg://user:password@host:5432/dbname"
        ) from None
    if backend not in SUPPORTED_BACKENDS:
        raise InvalidArgument(
            f"unsupported database {backend!r} in the store URL: use SQLite (one host) or PostgreSQL "
            "(several processes or replicas), e.g. postgresql+psycopg://user:password@host/dbname"
        )
    return backend


def make_engine(url: str) -> Engine:
    """An engine for a SQLite or PostgreSQL URL, configured for the store's concurrency rules."""
    backend = backend_of(url)
    if backend == "sqlite":
        return _sqlite_engine(url)
    if make_url(url).drivername == "postgresql":
        url = str(make_url(url).set(drivername="postgresql+psycopg"))
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _sqlite_engine(url: str) -> Engine:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise InvalidArgument(
            "the store needs a SQLite file (sqlite:////path/to/store.db), not an in-memory database"
        )
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Take transaction control away from the sqlite3 module; "begin" below emits our own.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        _use_wal(cursor)
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Readers never wait for writers in WAL mode; writers take the write lock up front.
        options = connection.get_execution_options()
        if options.get(SINGLE_READ_OPTION, False):
            return
        read_only = options.get(READ_ONLY_OPTION, False)
        connection.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")

    return engine


@contextlib.contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction for reads only (one consistent snapshot; on SQLite it takes no write lock)."""
    with engine.connect() as connection:
        connection.execution_options(**{READ_ONLY_OPTION: True})
        with connection.begin():
            yield connection


@contextlib.contextmanager
def single_read(engine: Engine) -> Iterator[Connection]:
    """A connection for exactly one SELECT: no BEGIN/COMMIT around it (one round trip)."""
    with engine.connect() as connection:
        connection.execution_options(**{SINGLE_READ_OPTION: True})
        yield connection
        connection.rollback()


def _use_wal(cursor) -> None:
    """Switch a new database to WAL. The switch fails at once (no busy wait) while another
    connection is creating the file, so it is retried; an existing WAL database costs one read."""
    import sqlite3

    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            cursor.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as exc:
            transient = "locked" in str(exc) or "busy" in str(exc)
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(0.005 + 0.02 * random.random())


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config)


def head_revision() -> str:
    head = _scripts().get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (the newest by default); safe when several processes
    open a new store at once."""
    current = current_revision(engine)
    if current == head_revision() and revision in ("head", current):
        return
    if current is not None and current not in {script.revision for script in _scripts().walk_revisions()}:
        raise FailedPrecondition(
            f"the store's database is at schema revision {current!r}, which this loraloom does not know: "
            "a newer loraloom created or upgraded it; run that version (or a newer one) against it"
        )
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        # SQLite: BEGIN IMMEDIATE already holds the write lock; the loser re-reads the head and does nothing.
        command.upgrade(_alembic_config(connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Take the schema back to ``revision`` (``"base"``: no tables), under the same lock as
    ``upgrade``. What a revision added is dropped with its data: back up first."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        command.downgrade(_alembic_config(connection), revision)


def _is_transient(exc: DBAPIError) -> bool:
    """Errors a retry of the whole transaction resolves: lock timeouts, deadlocks, unique races."""
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in ("40001", "40P01", "55P03", "23505"):
        return True
    message = str(exc.orig).lower()
    if isinstance(exc, OperationalError):
        return "database is locked" in message or "database is busy" in message
    return isinstance(exc, IntegrityError) and "unique constraint failed" in message


def run_transaction(engine: Engine, work: Callable[[Connection], T], *, attempts: int = 8) -> T:
    """Run ``work`` in one transaction, retrying it from the start on transient conflicts."""
    for attempt in range(1, attempts + 1):
        try:
            with engine.begin() as connection:
                return work(connection)
        except (OperationalError, IntegrityError) as exc:
            if attempt == attempts or not _is_transient(exc):
                raise
            time.sleep(min(0.5, 0.01 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------- reachability

# PostgreSQL SQLSTATEs besides class 08 (connection exception) that mean "not now":
# admin shutdown, crash shutdown, cannot connect now (starting up), too many connections.
_UNREACHABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})
# SQLite: the file cannot be opened or read, or stayed locked past the busy timeout.
_SQLITE_UNREACHABLE = (
    "unable to open database",
    "disk i/o error",
    "database is locked",
    "database is busy",
    "database or disk is full",
)
UNREACHABLE_MESSAGE = (
    "the adapter store's database is unreachable right now; retry in a few seconds "
    "(the server's log says why)"
)


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database cannot be reached now (a retry later may work)
    rather than a fault in a statement or the schema."""
    if isinstance(exc, PoolTimeout):  # no pooled connection came free in time
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return True
    if not isinstance(exc, OperationalError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate:
        return sqlstate.startswith("08") or sqlstate in _UNREACHABLE_SQLSTATES
    if type(exc.orig).__module__.startswith("sqlite3"):
        message = str(exc.orig).lower()
        return any(part in message for part in _SQLITE_UNREACHABLE)
    return True  # psycopg: a failed connect or a dropped connection carries no SQLSTATE


class Reachability:
    """Turns unreachable-database errors into ``StoreUnreachable`` and logs each outage once.

    ``with reach.guard(): ...`` around every call that talks to the database; the first
    failure of an outage is logged as a warning with its cause, the first success after
    it says the database is back.
    """

    def __init__(self, location: str) -> None:
        self.location = location
        self.down = False
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        try:
            yield
        except (DBAPIError, PoolTimeout) as exc:
            if not is_unreachable(exc):
                raise
            self._went_down(exc)
            raise StoreUnreachable(UNREACHABLE_MESSAGE) from exc
        if self.down:
            self._came_back()

    def _went_down(self, exc: BaseException) -> None:
        with self._lock:
            first, self.down = not self.down, True
        if first:
            cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            log.warning(
                "the store's database %s is unreachable: %s; store calls answer UNAVAILABLE until it is back",
                self.location,
                cause[0] if cause else type(exc).__name__,
            )

    def _came_back(self) -> None:
        with self._lock:
            was, self.down = self.down, False
        if was:
            log.warning("the store's database %s is reachable again", self.location)
