"""Where the engine gets adapters from: a reference -> an exact version -> a ``LoraAdapter``.

The engine depends only on the ``AdapterResolver`` protocol. ``StoreResolver``
serves from ``adapters.store.AdapterStore``; ``MemoryResolver`` holds adapters
registered in-process (from files, bytes or ``LoraAdapter`` objects), for tests,
benchmarks and embedding the engine without a store.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from adapters.canonical import LoraAdapter
from adapters.errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from adapters.store import AdapterStore


@dataclass(frozen=True)
class ResolvedAdapter:
    """An exact adapter version; ``load()`` reads and parses it (done once, then cached by the engine).

    ``module_names`` (the base model's module keys) lets the parser map kohya names
    and both text-encoder spellings onto the base's modules.
    """

    name: str
    version: int
    sha256: str
    loader: Callable[[frozenset[str] | None], LoraAdapter] = field(repr=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def load(self, module_names: Iterable[str] | None = None) -> LoraAdapter:
        return self.loader(frozenset(module_names) if module_names is not None else None)


class AdapterResolver(Protocol):
    """Turns ``name`` / ``name@3`` / ``name@alias`` into an exact version (raises ``NotFound``)."""

    def resolve(self, ref: str) -> ResolvedAdapter: ...


def _load_source(source: bytes | Path, module_names: Iterable[str] | None) -> LoraAdapter:
    from adapters.formats import load_adapter

    return load_adapter(source, module_names=module_names)


class StoreResolver:
    """Resolves through an ``AdapterStore`` and parses the version's blob on ``load()``."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    def resolve(self, ref: str) -> ResolvedAdapter:
        version = self.store.get(ref)
        store = self.store

        def load(names: frozenset[str] | None) -> LoraAdapter:
            return _load_source(store.blob_path(version), names)

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

    def resolve(self, ref: str) -> ResolvedAdapter:
        name, _, selector = ref.partition("@")
        with self._lock:
            versions = self._versions.get(name)
            if not versions:
                raise NotFound(f"adapter {name!r} not found; register it first")
            if not selector or selector == "latest":
                return versions[-1]
            if not selector.isdigit() or not 1 <= int(selector) <= len(versions):
                raise NotFound(
                    f"adapter {name!r} has no version {selector!r}; it has versions 1..{len(versions)}"
                )
            return versions[int(selector) - 1]
