"""Blob garbage collection against a registration in flight, ordered through the on_stage seam."""

from __future__ import annotations

import hashlib


def test_delete_of_the_last_user_while_a_registration_reuses_the_blob(make_store, lora):
    data = lora(seed=7)
    other = make_store()
    other.register("first", data)
    fired = []

    def on_stage(stage: str) -> None:
        # The new version's blob is written, its transaction not started: the only
        # current user goes, and with it the blob file.
        if stage == "blob_written" and not fired:
            fired.append(stage)
            assert [v.ref for v in other.delete("first")] == ["first@1"]
            assert not other.blobs.exists(hashlib.sha256(data).hexdigest())

    store = make_store(on_stage=on_stage)
    v = store.register("second", data)
    assert fired == ["blob_written"]
    assert store.blob_path(v).read_bytes() == data  # written again under the blob's row lock
    assert store.verify(grace_s=0).clean


def test_repair_while_a_registration_is_in_flight(make_store, lora):
    data = lora(seed=8)
    janitor = make_store()
    reports = []

    def on_stage(stage: str) -> None:
        if stage == "blob_written" and not reports:
            # The blob has no version yet, so it is an orphan right now.
            reports.append(janitor.verify(repair=True, grace_s=3600))

    store = make_store(on_stage=on_stage)
    v = store.register("cat", data)
    assert reports[0].removed == (v.sha256,)
    assert store.blob_path(v).read_bytes() == data
    assert store.verify(grace_s=0).clean


def test_a_deleted_name_starts_again_at_one(store, lora):
    store.register("cat", lora(seed=1))
    store.register("cat", lora(seed=2))
    store.delete("cat")
    assert store.register("cat", lora(seed=3)).version == 1
