"""A separate process that registers adapters into a store (crash and concurrency tests).

    python store_worker.py '<json job>'

job: db_url, store_dir, shapes_file (JSON module -> shape), name, files (paths to
register in order), kill_stage (SIGKILL this process when the store reaches that
register stage), read_bytes (stream the file in reads of this size), barrier
(wait until this file exists before opening the store). Prints one JSON line per
registered version: {"version", "sha256", "file"}.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from pathlib import Path

from adapters.canonical import BaseModelRef
from adapters.store import AdapterStore, LocalBlobStorage, make_validator


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


def main() -> None:
    job = json.loads(sys.argv[1])
    shapes = {key: tuple(shape) for key, shape in json.loads(Path(job["shapes_file"]).read_text()).items()}
    kill_stage = job.get("kill_stage")

    def on_stage(stage: str) -> None:
        if stage == kill_stage:
            print(json.dumps({"killed_at": stage}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    barrier = job.get("barrier")
    if barrier:
        while not os.path.exists(barrier):
            time.sleep(0.005)
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
        print(json.dumps({"version": version.version, "sha256": version.sha256, "file": file}), flush=True)
    store.close()


if __name__ == "__main__":
    main()
