"""The store's operations, on SQLite and on PostgreSQL (the same tests on both)."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime

import pytest

from adapters.errors import AdapterIncompatible, InvalidArgument, NotFound
from adapters.store import AdapterRef, AdapterStore, AdapterVersion, make_validator


def test_register_records_what_the_file_is(store, lora):
    data = lora(seed=1, rank=4)
    before = datetime.now(UTC)
    version = store.register(
        "pixel-style",
        data,
        description="8-bit look",
        tags=["style", "pixel"],
        trigger_words=["pixel art", "8bit"],
        base_model="loraloom:micro",
        training_metadata={"steps": 100, "lr": 1e-4, "dataset": {"images": 12}},
        expected_sha256=hashlib.sha256(data).hexdigest().upper(),
    )
    assert isinstance(version, AdapterVersion)
    assert (version.name, version.version, version.ref) == ("pixel-style", 1, "pixel-style@1")
    assert version.sha256 == hashlib.sha256(data).hexdigest()
    assert version.size_bytes == len(data)
    assert before <= version.created_at <= datetime.now(UTC)
    assert version.description == "8-bit look"
    assert version.tags == ("pixel", "style")
    assert version.trigger_words == ("pixel art", "8bit")
    assert version.base_architecture == "loraloom:micro"
    assert version.rank == 4
    assert version.format == "kohya"
    assert version.components == ("text_encoder", "unet")
    assert version.metadata["training"] == {"steps": 100, "lr": 1e-4, "dataset": {"images": 12}}
    assert version.aliases == ()
    assert store.get("pixel-style") == version
    assert store.blob_path(version).read_bytes() == data
    with store.open_blob("pixel-style@1") as stream:
        assert stream.read() == data


def test_sources_bytes_stream_and_path(store, lora, tmp_path):
    data = lora(seed=2)
    path = tmp_path / "in.safetensors"
    path.write_bytes(data)
    a = store.register("cat", data)
    b = store.register("cat", io.BytesIO(data))
    c = store.register("cat", path)
    assert [a.version, b.version, c.version] == [1, 2, 3]
    assert a.sha256 == b.sha256 == c.sha256
    # One blob serves all three versions.
    assert list(store.blobs.iter_blobs()) == [a.sha256]


def test_versions_aliases_and_refs(store, lora):
    for seed in range(3):
        store.register("cat", lora(seed=seed))
    assert store.get("cat").version == 3
    assert store.get("cat@latest").version == 3
    assert store.get(AdapterRef("cat", version=2)).version == 2
    moved = store.set_alias("cat", "stable", 1)
    assert moved.version == 1 and moved.aliases == ("stable",)
    assert store.get("cat@stable").version == 1
    store.set_alias("cat", "stable", 2)  # move
    assert store.get("cat@stable").version == 2
    assert store.get("cat@1").aliases == ()
    store.set_alias("cat", "canary", 2)
    assert store.get("cat@2").aliases == ("canary", "stable")
    store.remove_alias("cat", "canary")
    assert store.get("cat@2").aliases == ("stable",)
    assert [v.version for v in store.versions_of("cat")] == [1, 2, 3]


def test_register_points_aliases_at_the_new_version(store, lora):
    first = store.register("cat", lora(seed=1), aliases=["stable", "canary"])
    assert first.aliases == ("canary", "stable")
    second = store.register("cat", lora(seed=2), aliases=["canary"])
    assert second.aliases == ("canary",)
    assert store.get("cat@stable").version == 1
    assert store.get("cat@canary").version == 2
    with pytest.raises(InvalidArgument, match="all digits"):
        store.register("cat", lora(seed=3), aliases=["7"])
    assert store.get("cat").version == 2


def test_not_found_messages_say_what_exists(store, lora):
    store.register("cat", lora())
    with pytest.raises(NotFound, match="no adapter named 'dog'"):
        store.get("dog")
    with pytest.raises(NotFound, match=r"no version 7 \(it has versions 1\)"):
        store.get("cat@7")
    with pytest.raises(NotFound, match="no alias 'stable'.*loraloom adapters alias"):
        store.get("cat@stable")
    with pytest.raises(NotFound, match="no version 9"):
        store.set_alias("cat", "stable", 9)
    with pytest.raises(NotFound, match="no adapter named 'dog'"):
        store.set_alias("dog", "stable", 1)
    with pytest.raises(NotFound):
        store.delete("cat", 5)
    with pytest.raises(NotFound):
        store.delete("dog")
    with pytest.raises(NotFound):
        store.remove_alias("cat", "nope")


def test_bad_arguments_are_invalid(store, lora):
    data = lora()
    for bad in ("Cat", "../cat", "a/b", ""):
        with pytest.raises(InvalidArgument):
            store.register(bad, data)
    with pytest.raises(InvalidArgument):
        store.get("cat@0")
    with pytest.raises(InvalidArgument, match="tags must be a list"):
        store.register("cat", data, tags="style")
    with pytest.raises(InvalidArgument, match="tag"):
        store.register("cat", data, tags=["Bad Tag"])
    with pytest.raises(InvalidArgument, match="trigger word"):
        store.register("cat", data, trigger_words=["ok", "\x00"])
    with pytest.raises(InvalidArgument, match="plain JSON"):
        store.register("cat", data, training_metadata={"loss": float("nan")})
    with pytest.raises(InvalidArgument, match="expected_sha256"):
        store.register("cat", data, expected_sha256="xyz")
    with pytest.raises(InvalidArgument, match="not a str"):
        store.register("cat", "/etc/passwd")
    with pytest.raises(InvalidArgument):
        store.set_alias("cat", "3", 1)
    with pytest.raises(InvalidArgument, match="page_size"):
        store.list(page_size=0)
    with pytest.raises(InvalidArgument, match="page_token"):
        store.list(page_token="garbage!")
    with pytest.raises(InvalidArgument, match="prefix"):
        store.list(prefix="A%")
    with pytest.raises(NotFound):
        store.get("cat")  # nothing above was registered


def test_an_adapter_that_does_not_say_is_recorded_for_the_base_it_fits(store, lora):
    assert store.register("cat", lora()).base_architecture == "loraloom:micro"
    assert store.register("cat", lora(), base_model="loraloom:micro").base_architecture == "loraloom:micro"
    with pytest.raises(AdapterIncompatible, match="made for 'loraloom:micro'"):
        store.register("cat", lora(), base_model="sd_v1")


def test_declared_base_must_agree_with_the_file(store, lora):
    data = lora(metadata={"loraloom.base_architecture": "loraloom:micro"})
    with pytest.raises(AdapterIncompatible, match="made for 'loraloom:micro'"):
        store.register("cat", data, base_model="sd_v1")
    assert store.register("cat", data, base_model="loraloom:micro").base_architecture == "loraloom:micro"


def test_list_filters_and_pages(make_store, micro_shapes, lora):
    # No base model in the validator: the architecture comes from base_model alone here.
    store = make_store(validator=make_validator(micro_shapes))
    store.register("anime-a", lora(seed=1), tags=["anime"], base_model="loraloom:micro")
    store.register("anime-a", lora(seed=2), tags=["anime", "v2"], base_model="loraloom:micro")
    store.register("anime_b", lora(seed=3), tags=["anime"])
    store.register("animex", lora(seed=4))
    store.register("cat", lora(seed=5), tags=["pet"], base_model="loraloom:micro")

    def refs(page):
        return [v.ref for v in page.items]

    assert refs(store.list()) == ["anime-a@1", "anime-a@2", "anime_b@1", "animex@1", "cat@1"]
    assert refs(store.list(prefix="anime_")) == ["anime_b@1"]  # '_' is literal, not a wildcard
    assert refs(store.list(prefix="anime")) == ["anime-a@1", "anime-a@2", "anime_b@1", "animex@1"]
    assert refs(store.list(tag="anime")) == ["anime-a@1", "anime-a@2", "anime_b@1"]
    assert refs(store.list(tag="v2")) == ["anime-a@2"]
    assert refs(store.list(base_model="loraloom:micro")) == ["anime-a@1", "anime-a@2", "cat@1"]
    assert refs(store.list(tag="anime", base_model="loraloom:micro", prefix="anime")) == [
        "anime-a@1",
        "anime-a@2",
    ]
    assert refs(store.list(latest_only=True)) == ["anime-a@2", "anime_b@1", "animex@1", "cat@1"]
    assert refs(store.list(tag="nothing")) == []

    seen, token, pages = [], None, 0
    while True:
        page = store.list(page_size=2, page_token=token)
        seen += refs(page)
        pages += 1
        token = page.next_page_token
        if token is None:
            break
    assert pages == 3 and seen == refs(store.list())
    assert [v.ref for v in store.iter_all(prefix="anime", page_size=1)] == refs(store.list(prefix="anime"))
    # A page that ends exactly at the end has no next token.
    assert store.list(page_size=5).next_page_token is None


def test_delete_version_and_name_and_blob_sharing(store, lora):
    shared, other = lora(seed=1), lora(seed=2)
    v1 = store.register("cat", shared)
    v2 = store.register("cat", other)
    dog = store.register("dog", shared)
    store.set_alias("cat", "stable", 1)
    assert [v.ref for v in store.delete("cat", 1)] == ["cat@1"]
    # The blob stays: dog@1 still uses it; the alias went with the version.
    assert store.blobs.exists(v1.sha256)
    assert store.blob_path(dog).read_bytes() == shared
    with pytest.raises(NotFound):
        store.get("cat@stable")
    # Numbers are never reused while the name exists.
    assert store.register("cat", shared).version == 3
    assert [v.ref for v in store.delete("cat")] == ["cat@2", "cat@3"]
    assert not store.blobs.exists(v2.sha256)
    assert store.blobs.exists(v1.sha256)
    with pytest.raises(NotFound, match="no adapter named 'cat'"):
        store.get("cat")
    assert store.delete("dog", 1) == (dog,)
    assert not store.blobs.exists(v1.sha256)
    with pytest.raises(NotFound, match="no versions left"):
        store.get("dog")
    assert list(store.blobs.iter_blobs()) == []
    report = store.verify()
    assert report.clean and report.checked == 0


def test_verify_finds_corrupt_missing_and_orphan_blobs(store, lora):
    a = store.register("a", lora(seed=1))
    b = store.register("b", lora(seed=2))
    store.register("b", lora(seed=2))  # b@2 shares b@1's blob
    c = store.register("c", lora(seed=3))
    assert store.verify().clean

    path_a = store.blobs.path(a.sha256)
    path_a.chmod(0o644)
    path_a.write_bytes(path_a.read_bytes()[:-1] + b"!")
    store.blobs.path(b.sha256).unlink()
    orphan = store.blobs.put(io.BytesIO(b"nobody uses me"))
    report = store.verify()
    assert report.checked == 3
    assert report.corrupt == (a.sha256,)
    assert report.missing == (b.sha256,)
    assert report.broken_versions == ("a@1", "b@1", "b@2")
    assert report.orphans == (orphan.sha256,)
    assert not report.ok
    repaired = store.verify(repair=True)
    assert repaired.removed == (orphan.sha256,)
    assert not store.blobs.exists(orphan.sha256)
    assert store.blobs.exists(c.sha256)
    assert store.get("a").sha256 == a.sha256  # broken versions are reported, never silently dropped


def test_reopen_sees_the_same_store(db_url, store_dir, make_store, lora):
    first = make_store()
    v = first.register("cat", lora(), tags=["x"])
    first.set_alias("cat", "stable", 1)
    first.close()
    again = make_store()
    assert again.get("cat@stable") == store_get_with_alias(v)


def store_get_with_alias(v: AdapterVersion) -> AdapterVersion:
    from dataclasses import replace

    return replace(v, aliases=("stable",))


def test_open_uses_the_data_home(loraloom_home, lora, micro_shapes):
    with AdapterStore.open() as store:
        v = store.register("cat", lora())
        assert store.blob_path(v).is_relative_to(loraloom_home / "store" / "blobs")
    assert (loraloom_home / "store" / "adapters.sqlite3").is_file()
    with AdapterStore.open(loraloom_home) as store:
        assert store.get("cat").sha256 == v.sha256


def test_unsupported_database_urls(tmp_path):
    for url in ("mysql://u@h/db", "sqlite://", "not a url"):
        with pytest.raises(InvalidArgument):
            AdapterStore.open(tmp_path, db_url=url)


def test_resolve_is_one_statement_for_a_whole_blend(store, lora):
    """``resolve`` answers name, name@N, name@alias and name@latest together in one SQL statement."""
    from sqlalchemy import event

    first = store.register("ink", lora(seed=1))
    second = store.register("ink", lora(seed=2))
    other = store.register("moss", lora(seed=3), aliases=["stable"])
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    resolved = store.resolve(["ink", "ink@1", "moss@stable", "ink@latest", "moss"])
    assert [r.ref for r in resolved] == ["ink@2", "ink@1", "moss@1", "ink@2", "moss@1"]
    assert [r.sha256 for r in resolved[:3]] == [second.sha256, first.sha256, other.sha256]
    assert len(statements) == 1
    store.set_alias("ink", "stable", 1)
    assert store.resolve(["ink@stable"])[0].ref == "ink@1"
    with pytest.raises(NotFound, match="ink"):
        store.resolve(["moss", "ink@7"])
    with pytest.raises(NotFound):
        store.resolve(["nobody"])
