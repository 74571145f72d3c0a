"""Concurrency: processes registering one name at once get distinct versions and lose nothing."""

from __future__ import annotations

import hashlib

import pytest

PROCESSES = 2
EACH = 20


@pytest.mark.slow
def test_two_processes_register_one_name(run_workers, make_store, lora, tmp_path):
    files = {}
    for p in range(PROCESSES):
        for i in range(EACH):
            path = tmp_path / f"p{p}-{i:02d}.safetensors"
            path.write_bytes(lora(seed=1000 * p + i))
            files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    # The workers start together and also open the (not yet created) store at the same
    # moment: concurrent migrations, then concurrent registrations.
    jobs = [{"name": "shared", "files": sorted(f for f in files if f"/p{p}-" in f)} for p in range(PROCESSES)]
    results = []
    for code, lines in run_workers(*jobs):
        assert code == 0
        assert len(lines) == EACH
        # Each process sees its own versions increase.
        assert [line["version"] for line in lines] == sorted(line["version"] for line in lines)
        results += lines

    assert sorted(line["version"] for line in results) == list(range(1, PROCESSES * EACH + 1))
    store = make_store()
    versions = store.versions_of("shared")
    assert [v.version for v in versions] == list(range(1, PROCESSES * EACH + 1))
    by_version = {line["version"]: line for line in results}
    for v in versions:
        registered = by_version[v.version]
        assert v.sha256 == registered["sha256"] == files[registered["file"]]
        assert hashlib.sha256(store.blob_path(v).read_bytes()).hexdigest() == v.sha256
    report = store.verify(grace_s=0)
    assert report.clean and report.checked == PROCESSES * EACH


def test_threads_register_one_name(store, lora):
    import threading

    errors: list[BaseException] = []
    got: list[int] = []
    start = threading.Barrier(4)

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(5):
                got.append(store.register("threads", lora(seed=100 * t + i)).version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(got) == list(range(1, 21))
    assert store.verify().clean


def test_reads_do_not_wait_for_a_writer(store, lora):
    import time

    v = store.register("cat", lora())
    with store.engine.begin() as writer:  # holds SQLite's write lock / a PostgreSQL transaction
        writer.exec_driver_sql("UPDATE adapters SET last_version = last_version")
        started = time.monotonic()
        assert store.get("cat") == v
        assert [x.ref for x in store.list().items] == ["cat@1"]
        assert time.monotonic() - started < 5
