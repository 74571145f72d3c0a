"""Put a trained adapter where it is served: a local store, or a running server over gRPC."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.errors import InvalidArgument


@dataclass(frozen=True)
class Registration:
    """Where the adapter went: ``store`` (a location) or ``server`` (HOST:PORT), and its version."""

    name: str
    version: int
    sha256: str
    where: str
    kind: str  # "store" or "server"

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def register_in_store(
    data: bytes,
    name: str,
    *,
    store: str = "",
    description: str = "",
    tags: list[str] | tuple[str, ...] = (),
    trigger_words: list[str] | tuple[str, ...] = (),
    base_model: str = "",
    training_metadata: dict[str, Any] | None = None,
) -> Registration:
    """Register into ``store``: a data folder (its ``store/``), a database URL, or '' for the default.

    Like ``loraloom serve``, the store's other settings (``LORALOOM_STORE_DB_URL``,
    ``LORALOOM_S3_*``, ``LORALOOM_HOME``) come from the environment, so a trained
    adapter lands in the store the server reads.
    """
    from adapters.store.settings import StoreSettings
    from adapters.store.store import open_store

    if "://" in store:
        settings = StoreSettings.from_env(store_db_url=store)
    else:
        settings = StoreSettings.from_env(home=Path(store).expanduser() if store else None)
    with open_store(settings) as opened:
        version = opened.register(
            name,
            data,
            description=description,
            tags=tags,
            trigger_words=trigger_words,
            base_model=base_model,
            training_metadata=training_metadata,
        )
        where = f"the store at {opened.location}"
    return Registration(
        name=version.name, version=version.version, sha256=version.sha256, where=where, kind="store"
    )


def upload_to_server(
    data: bytes,
    name: str,
    *,
    server: str,
    description: str = "",
    tags: list[str] | tuple[str, ...] = (),
    trigger_words: list[str] | tuple[str, ...] = (),
    metadata: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> Registration:
    """Upload to the server at ``server`` (HOST:PORT); the new version is servable when this returns."""
    from server.client import Client

    if not server or ":" not in server:
        raise InvalidArgument(f"--server must be HOST:PORT, not {server!r}")
    with Client(server, timeout=timeout) as client:
        info = client.upload_adapter(
            data,
            name,
            description=description,
            metadata=metadata or {},
            tags=list(tags),
            trigger_words=list(trigger_words),
        )
    return Registration(name=info.name, version=info.version, sha256=info.sha256, where=server, kind="server")
