"""Separate processes that register adapters into a store (crash and concurrency tests).

    python store_worker.py '{"jobs": [job, ...]}'

The script imports the store once, then forks one child process per job (so N
workers cost one interpreter start, not N); children start together. A job:
db_url, store_dir, shapes_file (JSON module -> shape), name, files (paths to
register in order), kill_stage (the child SIGKILLs itself when the store
reaches that register stage), read_bytes (stream each file in reads of this
size). Every output line is JSON tagged with its job index: one per registered
version ({"version", "sha256", "file"}), {"killed_at"} just before a kill, and
at the end one {"exit": code} per job from the parent (-9 for SIGKILL).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import traceback
from pathlib import Path

import adapters.validation  # noqa: F401  (imported once here rather than in every child)
from adapters.canonical import BaseModelRef
from adapters.store import AdapterStore, LocalBlobStorage, make_validator

with contextlib.suppress(ImportError):
    import psycopg  # noqa: F401  (likewise, for PostgreSQL URLs)


class SmallReads(io.RawIOBase):
    """A stream that hands out at most ``size`` bytes per read, like a socket."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.size, self.pos = data, size, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        chunk = self.data[self.pos : self.pos + min(self.size, n if n >= 0 else self.size)]
        self.pos += len(chunk)
        return chunk


def emit(index: int, **fields) -> None:
    # One short write per line: lines from concurrent children never interleave.
    sys.stdout.write(json.dumps({"job": index, **fields}) + "\n")
    sys.stdout.flush()


def run(index: int, job: dict) -> None:
    shapes = {key: tuple(shape) for key, shape in json.loads(Path(job["shapes_file"]).read_text()).items()}
    kill_stage = job.get("kill_stage")

    def on_stage(stage: str) -> None:
        if stage == kill_stage:
            emit(index, killed_at=stage)
            os.kill(os.getpid(), signal.SIGKILL)

    store_dir = Path(job["store_dir"])
    store = AdapterStore(
        job["db_url"],
        LocalBlobStorage(store_dir / "blobs"),
        staging_dir=store_dir / "staging",
        validator=make_validator(shapes, BaseModelRef("loraloom:micro")),
        on_stage=on_stage,
    )
    for file in job["files"]:
        data = Path(file).read_bytes()
        version = store.register(job["name"], SmallReads(data, job.get("read_bytes", 1 << 20)))
        emit(index, version=version.version, sha256=version.sha256, file=file)
    store.close()


def main() -> None:
    jobs = json.loads(sys.argv[1])["jobs"]
    children: dict[int, int] = {}
    for index, job in enumerate(jobs):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run(index, job)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index
    for pid, index in children.items():
        _, status = os.waitpid(pid, 0)
        emit(index, exit=os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
