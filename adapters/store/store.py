"""The adapter store: versioned adapters, metadata in SQL, bytes in content-addressed blobs.

Register, in order (each step is a stage the ``on_stage`` hook sees):

1. ``streaming``: the incoming bytes go to a staging file, hashed on the way
   and fsynced (``staged``); a wrong ``expected_sha256`` stops here.
2. ``validated``: the validator reads the staged file; a bad file stops here.
3. ``blob_written``: the staged file becomes the blob (hard link or copy,
   fsync, rename, fsync of the folder).
4. one transaction allocates the next version number (an upsert that
   row-locks the name, so concurrent registrations queue instead of colliding),
   row-locks the blob, re-puts the blob if a concurrent delete removed it,
   inserts the version (``before_commit``) and commits (``committed``).

A version is therefore visible only once its blob is complete, its hash
checked and its contents validated; a crash at any point leaves at most a
staging file or an unused blob, which ``verify(repair=True)`` removes.

Reads: ``read_blob`` and ``load_version`` hash a version's bytes as they are read
and refuse them unless they match its recorded sha256; a missing, mismatching or
undecodable blob is ``BlobDamaged`` (DATA_LOSS) naming the version, counted in
``load_failures`` (see ``adapters.store.integrity``). An unreachable database is
``StoreUnreachable`` (UNAVAILABLE) from every method (see ``db.Reachability``).
"""

from __future__ import annotations

import base64
import binascii
import builtins
import contextlib
import functools
import io
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sqlalchemy import Connection, Engine, and_, delete, func, literal, or_, select, union_all
from sqlalchemy.dialects import postgresql, sqlite

from adapters.errors import AdapterIncompatible, AdapterInvalid, BlobDamaged, InvalidArgument, NotFound
from adapters.formats.base_ref import normalize_architecture
from adapters.home import data_home
from adapters.store import db
from adapters.store.blobs import BlobStorage, LocalBlobStorage
from adapters.store.hashing import check_sha256, copy_hashed, stale_files
from adapters.store.integrity import (
    MISSING,
    SHA256_MISMATCH,
    UNDECODABLE,
    LoadFailures,
    decode_check,
    read_checked,
)
from adapters.store.models import (
    AdapterFacts,
    AdapterPage,
    AdapterVersion,
    Damage,
    ResolvedVersion,
    VerifyReport,
)
from adapters.store.names import (
    AdapterRef,
    check_alias,
    check_name,
    check_tag,
    check_version,
    parse_ref,
)
from adapters.store.schema import adapters, aliases, blobs, version_tags, versions
from adapters.store.settings import MiB, StoreSettings
from adapters.store.validation import Validator, make_validator

if TYPE_CHECKING:
    from adapters.canonical import LoraAdapter

log = logging.getLogger(__name__)

DEFAULT_MAX_BLOB_BYTES = 4 * 1024**3
MAX_DESCRIPTION_CHARS = 10_000
MAX_TRIGGER_WORDS = 64
MAX_TRIGGER_WORD_CHARS = 200
MAX_TAGS = 64
MAX_TRAINING_METADATA_BYTES = 1 << 20
MAX_PAGE_SIZE = 1000
STAGING_SUFFIX = ".part"

StageHook = Callable[[str], None]
AdapterData = bytes | bytearray | memoryview | BinaryIO | os.PathLike
StoredVersion = AdapterVersion | ResolvedVersion


def _database(method):
    """``method`` under the store's ``db.Reachability`` guard: an unreachable database is
    ``StoreUnreachable`` (UNAVAILABLE), whatever the call."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with self._reach.guard():
            return method(self, *args, **kwargs)

    return guarded


class _Damaged(Exception):
    """A blob failed a check (internal: the caller names the version in a BlobDamaged)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class _Staged:
    path: Path
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class _NewVersion:
    name: str
    staged: _Staged
    facts: AdapterFacts
    description: str
    tags: tuple[str, ...]
    trigger_words: tuple[str, ...]
    base_architecture: str
    base_fingerprint: str
    metadata: dict[str, Any]
    aliases: tuple[str, ...]


class AdapterStore:
    """Versioned LoRA adapters. Thread-safe; several processes may share one database and blob storage."""

    def __init__(
        self,
        db_url: str,
        blob_storage: BlobStorage,
        *,
        staging_dir: Path,
        validator: Validator | None = None,
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        on_stage: StageHook | None = None,
    ) -> None:
        """Open (creating or upgrading the schema) the store at ``db_url`` with ``blob_storage``.

        ``staging_dir`` holds incoming uploads until they are checked; keep it on the
        same file system as a LocalBlobStorage so a blob is a hard link, not a copy.
        ``validator`` defaults to the safe parse without a base model
        (``make_validator()``); the server passes one built from its base model's shapes.
        ``on_stage`` is called with each register stage name (progress, fault injection).
        """
        self.engine: Engine = db.make_engine(db_url)
        self.backend = self.engine.dialect.name
        self._reach = db.Reachability(self.location)
        self.load_failures = LoadFailures()
        self._reported: set[tuple[str, str]] = set()
        self._reported_lock = threading.Lock()
        self.blobs = blob_storage
        self.staging_dir = Path(staging_dir)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.validator = validator if validator is not None else make_validator()
        self.max_blob_bytes = max_blob_bytes
        self._on_stage = on_stage
        try:
            with self._reach.guard():
                db.upgrade(self.engine)
        except BaseException:
            self.engine.dispose()
            raise

    @classmethod
    def open(
        cls,
        home: Path | None = None,
        db_url: str | None = None,
        *,
        blob_storage: BlobStorage | None = None,
        validator: Validator | None = None,
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        on_stage: StageHook | None = None,
    ) -> AdapterStore:
        """The store under ``home / "store"`` (``home`` defaults to ``adapters.home.data_home()``).

        The database is ``db_url``, else the SQLite file ``<home>/store/adapters.sqlite3``;
        blobs go to ``<home>/store/blobs`` unless ``blob_storage`` is given. Reads no
        environment: ``adapters.store.settings.open_store`` builds a store from settings
        (S3 included).
        """
        root = Path(home).expanduser() if home is not None else data_home()
        store_dir = root / "store"
        store_dir.mkdir(parents=True, exist_ok=True)
        url = db_url or db.sqlite_url(store_dir / "adapters.sqlite3")
        if blob_storage is None:
            blob_storage = LocalBlobStorage(store_dir / "blobs")
        return cls(
            url,
            blob_storage,
            staging_dir=store_dir / "staging",
            validator=validator,
            max_blob_bytes=max_blob_bytes,
            on_stage=on_stage,
        )

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AdapterStore({self.engine.url.render_as_string(hide_password=True)!r}, {self.blobs!r})"

    @property
    def location(self) -> str:
        """Where the metadata lives, for people: a SQLite file's path, else the database URL (no password)."""
        url = self.engine.url
        if url.get_backend_name() == "sqlite" and url.database:
            return url.database
        return url.render_as_string(hide_password=True)

    # ------------------------------------------------------------------ register

    @_database
    def register(
        self,
        name: str,
        data: AdapterData,
        *,
        description: str = "",
        tags: Iterable[str] = (),
        trigger_words: Iterable[str] = (),
        base_model: str = "",
        training_metadata: Mapping[str, Any] | None = None,
        expected_sha256: str | None = None,
        aliases: Iterable[str] = (),
    ) -> AdapterVersion:
        """Add a new version of ``name`` from bytes, a binary stream or a file path.

        ``base_model`` is the architecture the caller says the adapter was made for
        (e.g. ``sd_v1``, ``loraloom:tiny``); it must agree with what the file records.
        ``aliases`` are pointed at the new version in the same transaction that makes it
        visible (moved there if they exist).
        Raises InvalidArgument (bad arguments), AdapterInvalid (unsafe, corrupt or
        unsupported file, sha256 mismatch), AdapterIncompatible (wrong base model).
        """
        name = check_name(name)
        description = _check_description(description)
        tag_list = _check_tags(tags)
        alias_list = _check_aliases(aliases)
        words = _check_trigger_words(trigger_words)
        base_model = _check_base_model(base_model)
        training = _check_training_metadata(training_metadata)
        if expected_sha256 is not None:
            expected_sha256 = check_sha256(expected_sha256, "expected_sha256")

        with _as_stream(data) as stream:
            staged = self._stage_upload(stream)
        try:
            self._stage("staged")
            if expected_sha256 is not None and staged.sha256 != expected_sha256:
                raise AdapterInvalid(
                    f"sha256 mismatch for {name!r}: expected {expected_sha256}, the received bytes hash to "
                    f"{staged.sha256}; the transfer was corrupted or the wrong file was sent"
                )
            facts = self.validator(staged.path)
            architecture, fingerprint = _reconcile_base(facts, base_model)
            self._stage("validated")
            self.blobs.put_file(staged.path, staged.sha256)
            self._stage("blob_written")
            new = _NewVersion(
                name=name,
                staged=staged,
                facts=facts,
                description=description,
                tags=tag_list,
                trigger_words=words,
                base_architecture=architecture,
                base_fingerprint=fingerprint,
                metadata={"file": dict(facts.metadata), "training": training},
                aliases=alias_list,
            )
            version = db.run_transaction(self.engine, lambda conn: self._insert_version(conn, new))
            self._stage("committed")
        finally:
            staged.path.unlink(missing_ok=True)
        return version

    def _stage(self, stage: str) -> None:
        if self._on_stage is not None:
            self._on_stage(stage)

    def _stage_upload(self, stream: BinaryIO) -> _Staged:
        path = self.staging_dir / f"{secrets.token_hex(8)}{STAGING_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                sha256, size = copy_hashed(
                    stream, fd, max_bytes=self.max_blob_bytes, on_chunk=lambda _n: self._stage("streaming")
                )
            finally:
                os.close(fd)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if size == 0:
            path.unlink(missing_ok=True)
            raise AdapterInvalid("the adapter data is empty (0 bytes); send the .safetensors file's contents")
        return _Staged(path, sha256, size)

    def _insert_version(self, conn: Connection, new: _NewVersion) -> AdapterVersion:
        now = _now()
        upsert = _insert(conn, adapters).values(name=new.name, last_version=1, created_at=now)
        upsert = upsert.on_conflict_do_update(
            index_elements=[adapters.c.name], set_={"last_version": adapters.c.last_version + 1}
        ).returning(adapters.c.id, adapters.c.last_version)
        adapter_id, version = conn.execute(upsert).one()
        self._lock_blob(conn, new.staged.sha256, new.staged.size_bytes)
        if not self.blobs.exists(new.staged.sha256):
            # A concurrent delete or repair removed this blob after we wrote it; we hold its row now.
            self.blobs.put_file(new.staged.path, new.staged.sha256)
        version_id = conn.execute(
            versions.insert()
            .values(
                adapter_id=adapter_id,
                version=version,
                sha256=new.staged.sha256,
                size_bytes=new.staged.size_bytes,
                created_at=now,
                description=new.description,
                trigger_words=list(new.trigger_words),
                base_architecture=new.base_architecture,
                base_fingerprint=new.base_fingerprint,
                rank=new.facts.rank,
                format=new.facts.format,
                components=list(new.facts.components),
                metadata=new.metadata,
            )
            .returning(versions.c.id)
        ).scalar_one()
        if new.tags:
            conn.execute(version_tags.insert(), [{"version_id": version_id, "tag": tag} for tag in new.tags])
        for alias in new.aliases:
            self._point_alias(conn, adapter_id, alias, version_id)
        row = conn.execute(_version_query().where(versions.c.id == version_id)).one()
        self._stage("before_commit")
        return self._to_versions(conn, [row])[0]

    def _lock_blob(self, conn: Connection, sha256: str, size_bytes: int) -> None:
        """Insert the blob's row or row-lock the existing one (a no-op update takes the lock)."""
        stmt = _insert(conn, blobs).values(sha256=sha256, size_bytes=size_bytes, created_at=_now())
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[blobs.c.sha256], set_={"size_bytes": blobs.c.size_bytes}
            )
        )

    # ------------------------------------------------------------------ read

    @_database
    def get(self, ref: str | AdapterRef) -> AdapterVersion:
        """Resolve ``name`` (newest version), ``name@3``, ``name@alias`` or ``name@latest``."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        with db.read_transaction(self.engine) as conn:
            adapter_id = self._adapter_id(conn, parsed.name)
            query = _version_query().where(versions.c.adapter_id == adapter_id)
            if parsed.version is not None:
                query = query.where(versions.c.version == parsed.version)
            elif parsed.alias is not None:
                query = query.join(aliases, aliases.c.version_id == versions.c.id).where(
                    aliases.c.adapter_id == adapter_id, aliases.c.alias == parsed.alias
                )
            else:
                query = query.order_by(versions.c.version.desc()).limit(1)
            row = conn.execute(query).first()
            if row is None:
                raise self._not_found(conn, adapter_id, parsed)
            return self._to_versions(conn, [row])[0]

    @_database
    def resolve(self, refs: Sequence[str | AdapterRef]) -> builtins.list[ResolvedVersion]:
        """The exact version each reference points at now, in one SQL statement for all of them.

        The slim read for serving: no tags, aliases or metadata. A reference that matches
        nothing raises the same ``NotFound`` as ``get`` (found with a few more reads).
        """
        parsed = [parse_ref(ref) if isinstance(ref, str) else ref for ref in refs]
        if not parsed:
            return []
        parts = [_resolve_query(index, ref) for index, ref in enumerate(parsed)]
        query = parts[0] if len(parts) == 1 else union_all(*parts)
        with db.single_read(self.engine) as conn:
            rows = {row.idx: row for row in conn.execute(query)}
        missing = [ref for index, ref in enumerate(parsed) if index not in rows]
        if missing:
            self.get(missing[0])  # raises NotFound with what exists
            raise NotFound(f"adapter {missing[0]} was removed just now; list adapters and retry")
        return [ResolvedVersion(rows[i].name, rows[i].version, rows[i].sha256) for i in range(len(parsed))]

    def blob_path(self, version: AdapterVersion | str) -> Path:
        """A local file with the version's bytes (read-only; do not modify it). Not checked:
        read it into memory with ``read_blob`` / ``load_version``, which are."""
        resolved = version if isinstance(version, AdapterVersion) else self.get(version)
        return self.blobs.path(resolved.sha256)

    def open_blob(self, version: AdapterVersion | str) -> BinaryIO:
        """A binary stream of the version's bytes; the caller closes it. Not checked (a copy
        that streams elsewhere): read it into memory with ``read_blob`` / ``load_version``."""
        resolved = version if isinstance(version, AdapterVersion) else self.get(version)
        return self.blobs.open(resolved.sha256)

    def read_blob(self, version: StoredVersion) -> bytearray:
        """The version's bytes, hashed as they are read and checked against its recorded sha256.

        One buffer of the blob's size, filled in place (no second copy, no second read).
        A remote storage's local copy that fails is dropped and fetched once more first.
        Raises ``BlobDamaged`` (DATA_LOSS) naming the version when the blob is missing or
        its bytes do not hash to the recorded sha256.
        """
        try:
            return self._read_checked(version.sha256)
        except _Damaged as damage:
            raise self._damaged(version, damage) from None

    def load_version(self, version: StoredVersion, module_names: Iterable[str] | None = None) -> LoraAdapter:
        """The version parsed (``adapters.formats.load_adapter``) from its checked bytes.

        Raises ``BlobDamaged`` as ``read_blob`` does, and when bytes that hash right cannot
        be decoded (reason ``undecodable``: a stored version was valid when it was registered).
        """
        from adapters.formats import load_adapter

        data = self.read_blob(version)
        try:
            return load_adapter(data, module_names=module_names)
        except AdapterInvalid as exc:
            damage = _Damaged(UNDECODABLE, f"hash to the recorded sha256 but cannot be decoded ({exc})")
            raise self._damaged(version, damage) from None

    def _read_checked(self, sha256: str) -> bytearray:
        for attempt in (1, 2):
            try:
                with self.blobs.open(sha256) as stream:
                    data, digest = read_checked(stream)
            except NotFound:
                raise _Damaged(MISSING, "are missing from the blob storage") from None
            except AdapterInvalid:  # a remote object that does not hash to its key
                raise _Damaged(SHA256_MISMATCH, "do not hash to the recorded sha256") from None
            if digest == sha256:
                return data
            del data
            if attempt == 1 and self.blobs.drop_cached(sha256):
                continue  # the local copy was damaged: fetch it again
            raise _Damaged(SHA256_MISMATCH, f"hash to {digest[:16]}..., not the recorded sha256")
        raise AssertionError("unreachable")

    def _damaged(self, version: StoredVersion, damage: _Damaged) -> BlobDamaged:
        """Count and log (once per blob and reason) a failed load; the error for the caller."""
        self.load_failures.record(damage.reason)
        key = (version.sha256, damage.reason)
        with self._reported_lock:
            first = key not in self._reported
            self._reported.add(key)
        if first:
            log.error(
                "adapter %s is damaged (%s): blob %s %s in %r; run `loraloom adapters verify`",
                version.ref,
                damage.reason,
                version.sha256,
                damage.detail,
                self.blobs,
            )
        return BlobDamaged(
            f"adapter {version.ref} is damaged on this server, not by this request: its stored bytes "
            f"(blob {version.sha256}) {damage.detail}. An operator should run `loraloom adapters verify` "
            "(VerifyStore) to list the damaged versions, then upload the file again or delete the version",
            reason=damage.reason,
            ref=version.ref,
            sha256=version.sha256,
        )

    @_database
    def versions_of(self, name: str) -> tuple[AdapterVersion, ...]:
        """Every version of ``name``, oldest first."""
        name = check_name(name)
        with db.read_transaction(self.engine) as conn:
            adapter_id = self._adapter_id(conn, name)
            rows = conn.execute(
                _version_query().where(versions.c.adapter_id == adapter_id).order_by(versions.c.version)
            ).all()
            return tuple(self._to_versions(conn, rows))

    # ------------------------------------------------------------------ aliases

    @_database
    def set_alias(self, name: str, alias: str, version: int) -> AdapterVersion:
        """Point ``name@alias`` at ``version`` (creating the alias or moving it)."""
        name, alias, version = check_name(name), check_alias(alias), check_version(version)

        def work(conn: Connection) -> None:
            adapter_id = self._adapter_id(conn, name, lock=True)
            version_id = conn.execute(
                select(versions.c.id).where(
                    versions.c.adapter_id == adapter_id, versions.c.version == version
                )
            ).scalar()
            if version_id is None:
                raise self._not_found(conn, adapter_id, AdapterRef(name, version=version))
            self._point_alias(conn, adapter_id, alias, version_id)

        db.run_transaction(self.engine, work)
        return self.get(AdapterRef(name, version=version))

    def _point_alias(self, conn: Connection, adapter_id: int, alias: str, version_id: int) -> None:
        stmt = _insert(conn, aliases).values(adapter_id=adapter_id, alias=alias, version_id=version_id)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[aliases.c.adapter_id, aliases.c.alias], set_={"version_id": version_id}
            )
        )

    @_database
    def remove_alias(self, name: str, alias: str) -> None:
        name, alias = check_name(name), check_alias(alias)

        def work(conn: Connection) -> None:
            adapter_id = self._adapter_id(conn, name, lock=True)
            removed = conn.execute(
                delete(aliases).where(aliases.c.adapter_id == adapter_id, aliases.c.alias == alias)
            ).rowcount
            if not removed:
                raise self._not_found(conn, adapter_id, AdapterRef(name, alias=alias))

        db.run_transaction(self.engine, work)

    # ------------------------------------------------------------------ delete

    @_database
    def delete(self, name: str, version: int | None = None) -> tuple[AdapterVersion, ...]:
        """Delete one version, or the whole name with all its versions and aliases.

        Returns the deleted versions as they were (oldest first). A blob is removed once no version uses it.
        Aliases pointing at a deleted version go with it. Version numbers of a name
        are never reused while the name exists; deleting the whole name forgets it.
        """
        name = check_name(name)
        if version is not None:
            version = check_version(version)

        def work(conn: Connection) -> builtins.list[AdapterVersion]:
            adapter_id = self._adapter_id(conn, name, lock=True)
            query = _version_query().where(versions.c.adapter_id == adapter_id)
            if version is not None:
                query = query.where(versions.c.version == version)
            rows = conn.execute(query.order_by(versions.c.version)).all()
            if version is not None and not rows:
                raise self._not_found(conn, adapter_id, AdapterRef(name, version=version))
            gone = self._to_versions(conn, rows)
            if version is None:
                conn.execute(delete(adapters).where(adapters.c.id == adapter_id))
            else:
                conn.execute(delete(versions).where(versions.c.id == rows[0].id))
            return gone

        deleted = db.run_transaction(self.engine, work)
        used = {v.sha256 for v in deleted}
        # Then each blob in its own transaction: a crash in between leaves an unused blob
        # (verify's orphan), never a version whose blob is gone.
        for sha256 in sorted(used):
            db.run_transaction(self.engine, lambda conn, sha256=sha256: self._remove_if_unused(conn, sha256))
        return tuple(deleted)

    def _remove_if_unused(self, conn: Connection, sha256: str) -> bool:
        """Remove a blob (row and file) if no version uses it, holding its row lock.

        The file goes before commit, under the lock, so a registration waiting for the
        lock finds it gone and writes it again rather than committing a version without it.
        """
        self._lock_blob(conn, sha256, 0)
        in_use = conn.execute(select(func.count()).where(versions.c.sha256 == sha256)).scalar_one()
        if in_use:
            return False
        conn.execute(delete(blobs).where(blobs.c.sha256 == sha256))
        self.blobs.delete(sha256)
        return True

    # ------------------------------------------------------------------ verify

    @_database
    def verify(self, *, repair: bool = False, grace_s: float = 3600.0) -> VerifyReport:
        """Re-read every blob a version uses as ``load_version`` does (sha256, size, decoding);
        find missing, corrupt and undecodable blobs, orphans and temp files.

        With ``repair``: remove orphan blobs (safe against concurrent registrations:
        each goes under its row lock) and temp files older than ``grace_s`` (younger
        ones may belong to uploads in progress). Broken versions are only reported.
        A registration committing while this runs may show its blob among the orphans;
        repair re-checks each under its lock and keeps it.
        """
        # Blobs first, rows second: a blob whose version commits in between is not an orphan.
        stored = set(self.blobs.iter_blobs())
        with db.read_transaction(self.engine) as conn:
            rows = conn.execute(
                select(adapters.c.name, versions.c.version, versions.c.sha256, versions.c.size_bytes)
                .join(adapters, adapters.c.id == versions.c.adapter_id)
                .order_by(adapters.c.name, versions.c.version)
            ).all()
            blob_rows = set(conn.execute(select(blobs.c.sha256)).scalars())
        users: dict[str, builtins.list[str]] = {}
        sizes: dict[str, int] = {}
        for row in rows:
            users.setdefault(row.sha256, []).append(f"{row.name}@{row.version}")
            sizes[row.sha256] = int(row.size_bytes)
        found: dict[str, builtins.list[str]] = {MISSING: [], SHA256_MISMATCH: [], UNDECODABLE: []}
        damage: builtins.list[Damage] = []
        for sha256 in sorted(users):
            reason = self._check_blob(sha256, sizes[sha256])
            if reason is not None:
                found[reason].append(sha256)
                damage.extend(Damage(ref, sha256, reason) for ref in users[sha256])
        missing, corrupt, undecodable = found[MISSING], found[SHA256_MISMATCH], found[UNDECODABLE]
        broken = sorted(item.ref for item in damage)

        orphans = sorted((stored | blob_rows) - set(users))
        removed: builtins.list[str] = []
        if repair:
            for sha256 in orphans:
                if db.run_transaction(
                    self.engine, lambda conn, sha256=sha256: self._remove_if_unused(conn, sha256)
                ):
                    removed.append(sha256)
        partials = self._staging_partials(grace_s, repair) + self.blobs.partials(
            older_than_s=grace_s, remove=repair
        )
        if repair:
            removed.extend(partials)
        return VerifyReport(
            checked=len(users),
            missing=tuple(missing),
            corrupt=tuple(corrupt),
            broken_versions=tuple(broken),
            orphans=tuple(orphans),
            partials=tuple(partials),
            removed=tuple(removed),
            undecodable=tuple(undecodable),
            damage=tuple(sorted(damage, key=lambda item: item.ref)),
        )

    def _check_blob(self, sha256: str, size_bytes: int) -> str | None:
        """Why the blob is damaged (a reason of ``adapters.store.integrity``), or None when intact."""
        try:
            data = self._read_checked(sha256)
        except _Damaged as damage:
            return damage.reason
        if len(data) != size_bytes:
            return SHA256_MISMATCH
        try:
            decode_check(data)
        except AdapterInvalid:
            return UNDECODABLE
        return None

    def _staging_partials(self, older_than_s: float, remove: bool) -> builtins.list[str]:
        pattern = f"*{STAGING_SUFFIX}"
        return stale_files(self.staging_dir, pattern, older_than_s=older_than_s, remove=remove)

    # ------------------------------------------------------------------ list

    @_database
    def list(
        self,
        prefix: str | None = None,
        tag: str | None = None,
        base_model: str | None = None,
        page_size: int = 50,
        page_token: str | None = None,
        *,
        latest_only: bool = False,
    ) -> AdapterPage:
        """Versions ordered by (name, version), filtered by name prefix, tag and base architecture.

        ``latest_only`` keeps only the newest version of each name (then filters it).
        """
        if (
            isinstance(page_size, bool)
            or not isinstance(page_size, int)
            or not 1 <= page_size <= MAX_PAGE_SIZE
        ):
            raise InvalidArgument(f"invalid page_size {page_size!r}: use 1 to {MAX_PAGE_SIZE}")
        query = _version_query()
        if prefix:
            if not isinstance(prefix, str) or len(prefix) > 64 or not all(c in _NAME_CHARS for c in prefix):
                raise InvalidArgument(
                    f"invalid name prefix {prefix!r}: names use only a-z, 0-9, '.', '_', '-'"
                )
            query = query.where(adapters.c.name.startswith(prefix, autoescape=True))
        if tag is not None:
            tagged = select(version_tags.c.version_id).where(version_tags.c.tag == check_tag(tag))
            query = query.where(versions.c.id.in_(tagged))
        if base_model:
            query = query.where(versions.c.base_architecture == _check_base_model(base_model))
        if latest_only:
            newer = versions.alias("newer")
            query = query.where(
                ~select(newer.c.id)
                .where(newer.c.adapter_id == versions.c.adapter_id, newer.c.version > versions.c.version)
                .exists()
            )
        if page_token:
            after_name, after_version = _decode_token(page_token)
            query = query.where(
                or_(
                    adapters.c.name > after_name,
                    and_(adapters.c.name == after_name, versions.c.version > after_version),
                )
            )
        query = query.order_by(adapters.c.name, versions.c.version).limit(page_size + 1)
        with db.read_transaction(self.engine) as conn:
            rows = conn.execute(query).all()
            items = self._to_versions(conn, rows[:page_size])
        token = _encode_token(items[-1].name, items[-1].version) if len(rows) > page_size else None
        return AdapterPage(tuple(items), token)

    def iter_all(self, **filters: Any) -> Iterator[AdapterVersion]:
        """Every version matching ``list``'s filters, across pages."""
        token: str | None = None
        while True:
            page = self.list(page_token=token, **filters)
            yield from page.items
            token = page.next_page_token
            if token is None:
                return

    # ------------------------------------------------------------------ helpers

    def _adapter_id(self, conn: Connection, name: str, *, lock: bool = False) -> int:
        query = select(adapters.c.id).where(adapters.c.name == name)
        if lock:
            query = query.with_for_update()
        adapter_id = conn.execute(query).scalar()
        if adapter_id is None:
            raise NotFound(
                f"no adapter named {name!r} in the store; `loraloom adapters list` (ListAdapters) shows them"
            )
        return int(adapter_id)

    def _not_found(self, conn: Connection, adapter_id: int, ref: AdapterRef) -> NotFound:
        numbers = builtins.list(
            conn.execute(
                select(versions.c.version)
                .where(versions.c.adapter_id == adapter_id)
                .order_by(versions.c.version)
            ).scalars()
        )
        if not numbers:
            return NotFound(f"adapter {ref.name!r} has no versions left; upload or train one first")
        have = _first_few(numbers)
        if ref.version is not None:
            return NotFound(f"adapter {ref.name!r} has no version {ref.version} (it has versions {have})")
        if ref.alias is not None:
            names = builtins.list(
                conn.execute(
                    select(aliases.c.alias)
                    .where(aliases.c.adapter_id == adapter_id)
                    .order_by(aliases.c.alias)
                ).scalars()
            )
            known = f"its aliases are {_first_few(names)}" if names else "it has no aliases"
            return NotFound(
                f"adapter {ref.name!r} has no alias {ref.alias!r} ({known}); set one with "
                f"`loraloom adapters alias {ref.name} {ref.alias} VERSION` (SetAlias)"
            )
        return NotFound(f"adapter {ref.name!r} not found")

    def _to_versions(self, conn: Connection, rows: Sequence[Any]) -> builtins.list[AdapterVersion]:
        ids = [row.id for row in rows]
        tags: dict[int, builtins.list[str]] = {}
        names: dict[int, builtins.list[str]] = {}
        if ids:
            for version_id, tag in conn.execute(
                select(version_tags.c.version_id, version_tags.c.tag)
                .where(version_tags.c.version_id.in_(ids))
                .order_by(version_tags.c.tag)
            ):
                tags.setdefault(version_id, []).append(tag)
            for version_id, alias in conn.execute(
                select(aliases.c.version_id, aliases.c.alias)
                .where(aliases.c.version_id.in_(ids))
                .order_by(aliases.c.alias)
            ):
                names.setdefault(version_id, []).append(alias)
        return [
            AdapterVersion(
                name=row.name,
                version=int(row.version),
                sha256=row.sha256,
                size_bytes=int(row.size_bytes),
                created_at=_as_utc(row.created_at),
                description=row.description,
                tags=tuple(tags.get(row.id, ())),
                trigger_words=tuple(row.trigger_words),
                base_architecture=row.base_architecture,
                base_fingerprint=row.base_fingerprint,
                rank=int(row.rank),
                format=row.format,
                components=tuple(row.components),
                metadata=row.metadata,
                aliases=tuple(names.get(row.id, ())),
            )
            for row in rows
        ]


# ---------------------------------------------------------------------- module helpers

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")


def _insert(conn: Connection, table):
    """The dialect's INSERT with ON CONFLICT support (SQLite and PostgreSQL share its API)."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def _resolve_query(index: int, ref: AdapterRef):
    """The row ``ref`` points at, tagged with ``index`` (one arm of ``resolve``'s UNION ALL)."""
    query = select(
        literal(index).label("idx"), adapters.c.name, versions.c.version, versions.c.sha256
    ).select_from(versions.join(adapters, adapters.c.id == versions.c.adapter_id))
    query = query.where(adapters.c.name == ref.name)
    if ref.version is not None:
        return query.where(versions.c.version == ref.version)
    if ref.alias is not None:
        pointed = select(aliases.c.version_id).where(
            aliases.c.adapter_id == adapters.c.id, aliases.c.alias == ref.alias
        )
        return query.where(versions.c.id.in_(pointed))
    newer = versions.alias("newer")
    newest = select(func.max(newer.c.version)).where(newer.c.adapter_id == adapters.c.id)
    return query.where(versions.c.version == newest.scalar_subquery())


def _version_query():
    return select(versions, adapters.c.name).join(adapters, adapters.c.id == versions.c.adapter_id)


def _now() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _first_few(items: Sequence[object], limit: int = 10) -> str:
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


@contextlib.contextmanager
def _as_stream(data: AdapterData) -> Iterator[BinaryIO]:
    if isinstance(data, bytes | bytearray | memoryview):
        yield io.BytesIO(data)
    elif isinstance(data, os.PathLike):
        try:
            stream = open(data, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise InvalidArgument(f"adapter file {os.fspath(data)!r} does not exist") from None
        with stream:
            yield stream
    elif hasattr(data, "read"):
        yield data
    elif isinstance(data, str):
        raise InvalidArgument("pass adapter data as bytes, a binary stream or a pathlib.Path, not a str")
    else:
        raise InvalidArgument(
            f"adapter data must be bytes, a binary stream or a path, not {type(data).__name__}"
        )


def _reconcile_base(facts: AdapterFacts, base_model: str) -> tuple[str, str]:
    architecture = facts.base.architecture if facts.base else ""
    fingerprint = facts.base.fingerprint if facts.base else ""
    if base_model and architecture and base_model != architecture:
        raise AdapterIncompatible(
            f"base_model {base_model!r} was given, but the adapter was made for {architecture!r} (its file "
            "says so, or it was validated against that base model); leave base_model empty or correct it"
        )
    return architecture or base_model, fingerprint


def _check_description(description: object) -> str:
    if not isinstance(description, str):
        raise InvalidArgument("description must be a string")
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidArgument(
            f"description is {len(description)} characters; the limit is {MAX_DESCRIPTION_CHARS}"
        )
    return description


def _check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    if isinstance(tags, str):
        raise InvalidArgument(f"tags must be a list of strings, not the string {tags!r}")
    unique = sorted({check_tag(tag) for tag in tags})
    if len(unique) > MAX_TAGS:
        raise InvalidArgument(f"{len(unique)} tags given; the limit is {MAX_TAGS}")
    return tuple(unique)


def _check_aliases(names: Iterable[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        raise InvalidArgument(f"aliases must be a list of strings, not the string {names!r}")
    return tuple(sorted({check_alias(alias) for alias in names}))


def _check_trigger_words(words: Iterable[str]) -> tuple[str, ...]:
    if isinstance(words, str):
        raise InvalidArgument(f"trigger_words must be a list of strings, not the string {words!r}")
    result: builtins.list[str] = []
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise InvalidArgument(f"invalid trigger word {word!r}: use non-empty strings")
        if len(word) > MAX_TRIGGER_WORD_CHARS or not word.isprintable():
            raise InvalidArgument(
                f"invalid trigger word {word[:40]!r}: at most {MAX_TRIGGER_WORD_CHARS} printable characters"
            )
        if word not in result:
            result.append(word)
    if len(result) > MAX_TRIGGER_WORDS:
        raise InvalidArgument(f"{len(result)} trigger words given; the limit is {MAX_TRIGGER_WORDS}")
    return tuple(result)


def _check_base_model(base_model: object) -> str:
    """An architecture name in its normal spelling (``SD_v1.5`` and ``sd1`` both mean ``sd_v1``)."""
    if not isinstance(base_model, str) or len(base_model) > 128 or not base_model.isprintable():
        raise InvalidArgument(f"invalid base_model {base_model!r}: a short architecture name such as 'sd_v1'")
    return normalize_architecture(base_model) if base_model.strip() else ""


def _check_training_metadata(training: Mapping[str, Any] | None) -> dict[str, Any]:
    if training is None:
        return {}
    if not isinstance(training, Mapping):
        raise InvalidArgument("training_metadata must be a mapping (a JSON object)")
    try:
        encoded = json.dumps(dict(training), allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(
            f"training_metadata must be plain JSON (str keys, finite numbers): {exc}"
        ) from None
    if len(encoded) > MAX_TRAINING_METADATA_BYTES:
        raise InvalidArgument(f"training_metadata is {len(encoded)} bytes as JSON; the limit is 1 MiB")
    return json.loads(encoded)


def _encode_token(name: str, version: int) -> str:
    raw = json.dumps([name, version], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[str, int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        name, version = json.loads(raw)
        return check_name(name), check_version(version)
    except (ValueError, TypeError, binascii.Error, InvalidArgument):
        raise InvalidArgument(
            f"invalid page_token {token[:40]!r}: pass back the next_page_token of the previous page unchanged"
        ) from None


def open_store(
    settings: StoreSettings, *, validator: Validator | None = None, on_stage: StageHook | None = None
) -> AdapterStore:
    """The ``AdapterStore`` the settings describe (S3 blobs when ``s3_bucket`` is set)."""
    blob_storage = None
    if settings.s3_bucket:
        from adapters.store.s3 import S3BlobStorage, S3Settings

        s3 = S3Settings(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint,
            region=settings.s3_region,
            cache_bytes=settings.blob_cache_mb * MiB,
        )
        blob_storage = S3BlobStorage(s3, settings.root / "store" / "blob-cache")
    return AdapterStore.open(
        settings.root,
        settings.store_db_url,
        blob_storage=blob_storage,
        validator=validator,
        max_blob_bytes=settings.max_upload_bytes,
        on_stage=on_stage,
    )
