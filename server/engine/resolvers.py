"""Where the engine gets adapters from: references -> exact versions -> ``LoraAdapter``.

The engine depends only on the ``AdapterResolver`` protocol. ``StoreResolver``
serves from ``adapters.store.AdapterStore``: a whole blend's references cost one
SQL statement, and a small cache answers repeats without any (alias moves,
uploads and deletes through this server drop its entries at once; those made by
other replicas show after ``ttl_s``). While the store's database is unreachable
(``Unavailable``) it serves the last resolution it knows of each reference, however
old (stale-if-error; logged once per outage): resolved and resident adapters keep
generating, only references never resolved fail. A version's bytes are read with
``AdapterStore.load_version``: hashed as read and checked against the recorded
sha256 (a damaged blob is DATA_LOSS naming the version). ``MemoryResolver`` holds adapters
registered in-process (from files, bytes or ``LoraAdapter`` objects), for tests,
benchmarks and embedding the engine without a store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from adapters.canonical import LoraAdapter
from adapters.errors import InvalidArgument, NotFound, Unavailable
from adapters.store.names import parse_ref
from server.engine.types import ResolvedAdapter

if TYPE_CHECKING:
    from adapters.store import AdapterStore

log = logging.getLogger(__name__)

RESOLVE_CACHE_ENTRIES = 4096


class AdapterResolver(Protocol):
    """Turns ``name`` / ``name@3`` / ``name@alias`` references into exact versions (raises ``NotFound``)."""

    def resolve(self, refs: Sequence[str]) -> list[ResolvedAdapter]: ...

    def invalidate(self, name: str | None = None) -> None: ...


def resolve_one(resolver: AdapterResolver, ref: str) -> ResolvedAdapter:
    return resolver.resolve([ref])[0]


def _load_source(source: bytes | Path, module_names) -> LoraAdapter:
    from adapters.formats import load_adapter

    return load_adapter(source, module_names=module_names)


class StoreResolver:
    """Resolves through an ``AdapterStore`` (cached ``ttl_s``, stale-if-error); ``load()`` parses
    the version's checked blob."""

    def __init__(
        self, store: AdapterStore, *, ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._clock = clock
        # ref -> (resolution, fresh until); kept past that as the fallback while the store is down
        self._cache: dict[str, tuple[ResolvedAdapter, float]] = {}
        self._lock = threading.Lock()
        self.outage = False  # the store was unreachable on the last lookup
        self.stale_served = 0  # references answered from a stale entry, since start

    def resolve(self, refs: Sequence[str]) -> list[ResolvedAdapter]:
        now = self._clock()
        found: dict[str, ResolvedAdapter] = {}
        with self._lock:
            for ref in refs:
                hit = self._cache.get(ref)
                if hit is not None and hit[1] > now:
                    found[ref] = hit[0]
        missing = list(dict.fromkeys(ref for ref in refs if ref not in found))
        if missing:
            try:
                versions = self.store.resolve(missing)
            except Unavailable as error:
                found.update(self._stale(missing, error))
                return [found[ref] for ref in refs]
            if self.outage:
                self.outage = False
                log.warning("the adapter store answers again; references are resolved afresh")
            fresh = dict(zip(missing, map(self._resolved, versions), strict=True))
            found.update(fresh)
            with self._lock:  # kept even with ttl_s 0: the fallback while the store is unreachable
                if len(self._cache) > RESOLVE_CACHE_ENTRIES:
                    self._cache.clear()
                for ref, resolved in fresh.items():
                    self._cache[ref] = (resolved, now + self.ttl_s)
        return [found[ref] for ref in refs]

    def _stale(self, refs: Sequence[str], error: Unavailable) -> dict[str, ResolvedAdapter]:
        """The last resolution of each of ``refs`` while the store is unreachable; ``error`` when
        one of them was never resolved."""
        with self._lock:
            known = {ref: self._cache[ref][0] for ref in refs if ref in self._cache}
        if len(known) < len(refs):
            raise error
        self.stale_served += len(known)
        if not self.outage:
            self.outage = True
            log.warning(
                "the adapter store is unreachable (%s); serving references as last resolved "
                "(names may point at newer versions meanwhile) until it answers again",
                error,
            )
        return known

    def invalidate(self, name: str | None = None) -> None:
        """Forget what ``name``'s references (or all, with ``None``) resolved to."""
        with self._lock:
            if name is None:
                self._cache.clear()
                return
            for ref in [ref for ref in self._cache if ref.partition("@")[0] == name]:
                del self._cache[ref]

    def _resolved(self, version) -> ResolvedAdapter:
        store = self.store

        def load(names: frozenset[str] | None) -> LoraAdapter:
            return store.load_version(version, names)  # hashed as read; BlobDamaged if damaged

        return ResolvedAdapter(name=version.name, version=version.version, sha256=version.sha256, loader=load)


class MemoryResolver:
    """Adapters registered in this process, versioned like the store (``name``, ``name@N``)."""

    def __init__(self) -> None:
        self._versions: dict[str, list[ResolvedAdapter]] = {}
        self._lock = threading.Lock()

    def add_file(self, name: str, path: str | os.PathLike) -> ResolvedAdapter:
        """Register a ``.safetensors`` adapter file; it is parsed on first use, not now."""
        path = Path(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._add(name, digest, lambda names: _load_source(path, names))

    def add_bytes(self, name: str, data: bytes) -> ResolvedAdapter:
        """Register an adapter file's bytes (any format ``adapters.formats`` reads)."""
        data = bytes(data)
        return self._add(name, hashlib.sha256(data).hexdigest(), lambda names: _load_source(data, names))

    def add_adapter(self, name: str, adapter: LoraAdapter) -> ResolvedAdapter:
        """Register a parsed adapter; its sha256 is that of its canonical file."""
        from adapters.formats import save_canonical

        digest = hashlib.sha256(save_canonical(adapter)).hexdigest()
        return self._add(name, digest, lambda names: adapter)

    def _add(
        self, name: str, sha256: str, loader: Callable[[frozenset[str] | None], LoraAdapter]
    ) -> ResolvedAdapter:
        if not name or "@" in name or ":" in name:
            raise InvalidArgument(f"invalid adapter name {name!r}: no '@' or ':' and not empty")
        with self._lock:
            versions = self._versions.setdefault(name, [])
            resolved = ResolvedAdapter(name=name, version=len(versions) + 1, sha256=sha256, loader=loader)
            versions.append(resolved)
            return resolved

    def resolve(self, refs: Sequence[str]) -> list[ResolvedAdapter]:
        return [self._resolve(ref) for ref in refs]

    def invalidate(self, name: str | None = None) -> None:
        """Nothing to forget: registrations here are seen at once."""

    def _resolve(self, ref: str) -> ResolvedAdapter:
        parsed = parse_ref(ref)
        with self._lock:
            versions = self._versions.get(parsed.name)
            if not versions:
                raise NotFound(f"adapter {parsed.name!r} not found; register it first")
            if parsed.alias is not None:
                raise NotFound(
                    f"adapter {parsed.name!r} has no alias {parsed.alias!r} (in-memory adapters have none)"
                )
            if parsed.version is None:
                return versions[-1]
            if not 1 <= parsed.version <= len(versions):
                raise NotFound(
                    f"adapter {parsed.name!r} has no version {parsed.version}; "
                    f"it has versions 1..{len(versions)}"
                )
            return versions[parsed.version - 1]
