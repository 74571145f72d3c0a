"""Crash safety: registering processes SIGKILLed at each register stage leave no partial version.

The kill comes from inside the worker, through the store's ``on_stage`` seam, so it
lands exactly at the stage named; the code under test is not patched.
"""

from __future__ import annotations

import hashlib
import signal

import pytest

# Every register stage, in order; each worker dies at one.
STAGES = ("streaming", "staged", "validated", "blob_written", "before_commit", "committed")


@pytest.mark.slow
def test_killed_registrations_leave_no_partial_version(make_store, run_workers, lora, tmp_path):
    store = make_store()
    first = store.register("cat", lora(seed=100))
    files = {}
    for index, stage in enumerate(STAGES):
        files[stage] = tmp_path / f"{stage}.safetensors"
        files[stage].write_bytes(lora(seed=index))
    sha = {stage: hashlib.sha256(path.read_bytes()).hexdigest() for stage, path in files.items()}

    # All at once: the one killed holding the name's row lock must not block the others for good.
    results = run_workers(
        *(
            {"name": "cat", "files": [str(files[stage])], "kill_stage": stage, "read_bytes": 512}
            for stage in STAGES
        )
    )
    for stage, (code, lines) in zip(STAGES, results, strict=True):
        assert code == -signal.SIGKILL, stage
        assert lines == [{"killed_at": stage}], stage

    # Only the version whose transaction committed is visible, and it is whole.
    visible = store.versions_of("cat")
    assert [v.version for v in visible] == [1, 2]
    assert visible[0] == first
    assert visible[1].sha256 == sha["committed"]
    assert store.blob_path(visible[1]).read_bytes() == files["committed"].read_bytes()
    assert [v.ref for v in store.list().items] == ["cat@1", "cat@2"]

    report = store.verify(grace_s=0)
    assert report.ok and report.checked == 2
    assert report.missing == () and report.corrupt == () and report.broken_versions == ()
    # What the dead writers left is garbage that is reported, never a version.
    assert set(report.orphans) == {sha["blob_written"], sha["before_commit"]}
    assert len(report.partials) == len(STAGES)  # each dead writer's staging file

    repaired = store.verify(repair=True, grace_s=0)
    assert repaired.ok and set(repaired.removed) == set(report.orphans) | set(report.partials)
    after = store.verify(grace_s=0)
    assert after.clean and after.orphans == () and after.partials == ()
    assert store.blob_path(visible[1]).read_bytes() == files["committed"].read_bytes()
    assert store.blob_path(first).read_bytes() == lora(seed=100)

    # The killed transaction burnt no version number; the store goes on as before.
    again = store.register("cat", files["before_commit"].read_bytes())
    assert again.version == 3
    assert store.blob_path(again).read_bytes() == files["before_commit"].read_bytes()
    assert store.verify(grace_s=0).clean


def test_young_partials_are_kept_for_uploads_in_progress(store):
    leftover = store.staging_dir / "upload.part"
    leftover.write_bytes(b"half an upload")
    report = store.verify(repair=True)  # default grace: an hour
    assert report.partials == () and leftover.exists()
    assert store.verify(repair=True, grace_s=0).removed == (str(leftover),)
    assert not leftover.exists()
