"""Store fixtures: a real SQLite file and a real PostgreSQL server, adapter files from the micro model.

PostgreSQL: ``LORALOOM_TEST_POSTGRES_URL`` (a role that may CREATE DATABASE) if set;
otherwise a throwaway cluster from ``/usr/lib/postgresql/*/bin`` (``.ci/postgres.sh``
installs them; see ``pgcluster.py``) on a free 127.0.0.1 port for the session; otherwise
those tests skip.
Every test gets its own fresh schema.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from adapters.canonical import BaseModelRef
from tests.store.pgcluster import bindir_or_skip, throwaway_cluster

ENV_URL = "LORALOOM_TEST_POSTGRES_URL"
MICRO_BASE = BaseModelRef("loraloom:micro")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """An admin URL of a PostgreSQL server for the whole session."""
    url = os.environ.get(ENV_URL)
    if url:
        yield url
        return
    with throwaway_cluster(bindir_or_skip(f"; or set {ENV_URL}")) as cluster:
        yield cluster.url


@pytest.fixture()
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty schema on the session's server (the URL sets search_path), dropped after the test.

    A schema costs a millisecond where CREATE DATABASE costs a few hundred, and needs
    no CREATEDB privilege on a server given through LORALOOM_TEST_POSTGRES_URL.
    """
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(postgres_server)
    schema = f"loraloom_test_{secrets.token_hex(6)}"
    plain = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        url = admin.update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path: Path) -> str:
    """The store database: a SQLite file, then a PostgreSQL database (same tests on both)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'adapters.sqlite3'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def micro_shapes(micro_pipeline) -> dict[str, tuple[int, ...]]:
    from server.models.shapes import module_shapes

    return dict(module_shapes(micro_pipeline))


@pytest.fixture()
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture()
def make_store(db_url: str, store_dir: Path, micro_shapes):
    """Open a store on ``db_url`` (validating against the micro model unless told otherwise)."""
    from adapters.store import AdapterStore, LocalBlobStorage, make_validator

    opened = []

    def open_store(**kwargs):
        kwargs.setdefault("validator", make_validator(micro_shapes, MICRO_BASE))
        store = AdapterStore(
            db_url, LocalBlobStorage(store_dir / "blobs"), staging_dir=store_dir / "staging", **kwargs
        )
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture()
def store(make_store):
    return make_store()


def kohya_file(
    shapes: dict[str, tuple[int, ...]],
    *,
    seed: int = 0,
    rank: int = 2,
    count: int = 3,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """A kohya / A1111 LoRA file (``lora_unet_*`` / ``lora_te_*``) for the first ``count`` linear layers."""
    generator = torch.Generator().manual_seed(seed)
    linear = [key for key, shape in sorted(shapes.items()) if len(shape) == 2]
    chosen = [key for key in linear if key.startswith("unet.")][: count - 1]
    chosen += [key for key in linear if key.startswith("text_encoder.")][:1]
    tensors: dict[str, torch.Tensor] = {}
    for key in chosen:
        component, path = key.split(".", 1)
        stem = ("lora_unet_" if component == "unet" else "lora_te_") + path.replace(".", "_")
        out_features, in_features = shapes[key]
        tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
        tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    return save(tensors, metadata=metadata)


@pytest.fixture()
def lora(micro_shapes):
    """``lora(seed=..., rank=...)`` -> the bytes of a valid kohya LoRA for the micro model."""

    def build(**kwargs) -> bytes:
        return kohya_file(micro_shapes, **kwargs)

    return build


def wait_for(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("store_worker.py")


@pytest.fixture()
def run_workers(db_url: str, store_dir: Path, micro_shapes, tmp_path: Path):
    """``run_workers(job, job, ...)``: run each job in its own process (``store_worker.py``) at once.

    A job is a dict (name, files, kill_stage, read_bytes); returns, per job, its exit
    code (-9 when SIGKILLed) and its output lines.
    """
    import json
    import sys

    shapes_file = tmp_path / "shapes.json"
    shapes_file.write_text(json.dumps(micro_shapes))

    def run(*jobs: dict, timeout_s: float = 120.0) -> list[tuple[int, list[dict]]]:
        full = [
            {"db_url": db_url, "store_dir": str(store_dir), "shapes_file": str(shapes_file), **job}
            for job in jobs
        ]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        done = subprocess.run(
            [sys.executable, str(WORKER), json.dumps({"jobs": full})],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            timeout=timeout_s,
        )
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        results = []
        for index in range(len(jobs)):
            mine = [line for line in lines if line["job"] == index]
            exits = [line["exit"] for line in mine if "exit" in line]
            if done.returncode != 0 or exits[:1] not in ([0], [-9]):
                raise AssertionError(f"worker {index} failed (exit {exits}):\n{done.stderr[-3000:]}")
            results.append(
                (
                    exits[0],
                    [{k: v for k, v in line.items() if k != "job"} for line in mine if "exit" not in line],
                )
            )
        return results

    return run
