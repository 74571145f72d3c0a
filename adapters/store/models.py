"""Plain data the store hands out: versions, pages, verify reports, validation facts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from adapters.canonical import BaseModelRef


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable adapter version as registered.

    ``metadata`` is ``{"file": <the adapter file's own metadata, str -> str>,
    "training": <training_metadata given to register>}``. ``rank`` is the largest
    rank over the adapter's modules; ``format`` is the file's layout (kohya,
    diffusers, peft, canonical) as the validator detected it.
    """

    name: str
    version: int
    sha256: str
    size_bytes: int
    created_at: datetime
    description: str = ""
    tags: tuple[str, ...] = ()
    trigger_words: tuple[str, ...] = ()
    base_architecture: str = ""
    base_fingerprint: str = ""
    rank: int = 0
    format: str = ""
    components: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        """The exact reference, ``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def base(self) -> BaseModelRef | None:
        if not self.base_architecture:
            return None
        return BaseModelRef(self.base_architecture, self.base_fingerprint)


@dataclass(frozen=True)
class ResolvedVersion:
    """What a reference points at now: the exact version and its blob (what serving needs)."""

    name: str
    version: int
    sha256: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class AdapterPage:
    """One page of ``AdapterStore.list``; pass ``next_page_token`` back for the next (None: last page)."""

    items: tuple[AdapterVersion, ...]
    next_page_token: str | None = None


@dataclass(frozen=True)
class AdapterFacts:
    """What a validator learned from an adapter file, recorded with the version."""

    rank: int
    components: tuple[str, ...]
    format: str
    base: BaseModelRef | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Damage:
    """One damaged version: its ref (``name@3``), its blob's sha256 and why (``missing``,
    ``sha256_mismatch`` or ``undecodable``, as in ``adapters.store.integrity``)."""

    ref: str
    sha256: str
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    """The result of ``AdapterStore.verify``.

    ``missing`` / ``corrupt`` / ``undecodable``: sha256s that versions use whose blob
    is absent, no longer hashes to its name (or has another size), or hashes right but
    cannot be decoded as an adapter; ``broken_versions`` lists those versions and
    ``damage`` each with its reason. ``orphans``: blobs no version uses (left by an
    interrupted register or delete). ``partials``: temp files of interrupted writes.
    ``removed``: what a ``repair`` run deleted. ``ok`` means every visible version is intact.
    """

    checked: int
    missing: tuple[str, ...] = ()
    corrupt: tuple[str, ...] = ()
    broken_versions: tuple[str, ...] = ()
    orphans: tuple[str, ...] = ()
    partials: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    undecodable: tuple[str, ...] = ()
    damage: tuple[Damage, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt and not self.undecodable

    @property
    def clean(self) -> bool:
        """Intact and without leftovers (after a repair, the leftovers are in ``removed``)."""
        return self.ok and not (set(self.orphans) | set(self.partials)) - set(self.removed)
