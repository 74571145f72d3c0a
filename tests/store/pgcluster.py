"""Throwaway PostgreSQL clusters for tests: one shared by a session (``conftest.postgres_server``),
or a dedicated one a test may stop and start again (a database outage) without disturbing others.

The server binaries come from ``/usr/lib/postgresql/*/bin`` (``.ci/postgres.sh`` installs them).
As root, the cluster runs as the ``postgres`` user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

INITDB_GLOB = "/usr/lib/postgresql/*/bin/initdb"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def as_cluster_owner(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


def bindir_or_skip(hint: str = "") -> Path:
    """The folder of the newest installed PostgreSQL server binaries; skips the test when none."""
    initdbs = sorted(glob.glob(INITDB_GLOB))
    if not initdbs:
        pytest.skip(f"no PostgreSQL server binaries ({INITDB_GLOB}; .ci/postgres.sh installs them){hint}")
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip(f"running as root with no 'postgres' user to run the server as{hint}")
    return Path(initdbs[-1]).parent


class Cluster:
    """One initialized cluster on 127.0.0.1; ``stop()`` and ``start()`` keep its data and port."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.port = 0

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        subprocess.run(
            as_cluster_owner(
                [
                    *(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust"),
                    *("-E", "UTF8", "--no-sync", "--no-instructions"),
                ]
            ),
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        """Start on the cluster's port (a free one the first time; retried if taken meanwhile)."""
        for attempt in range(3):
            port = self.port or free_port()
            options = (
                f"-p {port} -h 127.0.0.1 -k '' -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=200"
            )
            started = subprocess.run(
                as_cluster_owner(
                    [
                        *(
                            str(self.bindir / "pg_ctl"),
                            "-D",
                            str(self.data),
                            "-l",
                            str(self.root / "server.log"),
                        ),
                        *("-o", options, "-w", "-t", "60", "start"),
                    ]
                ),
                capture_output=True,
                text=True,
            )
            if started.returncode == 0:
                self.port = port
                return
            if attempt == 2:
                log = (self.root / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"could not start PostgreSQL: {started.stderr}\n{log}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: open connections are closed; ``immediate``: a crash)."""
        subprocess.run(
            as_cluster_owner([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]),
            capture_output=True,
        )


@contextlib.contextmanager
def throwaway_cluster(bindir: Path) -> Iterator[Cluster]:
    """A started cluster, stopped and deleted afterwards."""
    # Not under pytest's tmp folder: that is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="loraloom-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    cluster = Cluster(bindir, root)
    try:
        cluster.init()
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)
