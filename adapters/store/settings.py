"""Where the store lives: one settings object for the server, the trainer and the CLI alike.

Read from ``LORALOOM_*`` variables by the entry points only (``from_env``);
``adapters.store.store.open_store`` is the one place that turns the settings into
an ``AdapterStore`` with local or S3 blobs. Plain data: importing this module
costs no SQLAlchemy or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adapters.envsettings import from_env as _from_env
from adapters.home import data_home

MiB = 1 << 20


@dataclass(frozen=True)
class StoreSettings:
    """The store section of the settings (``LORALOOM_<FIELD>`` for each field)."""

    home: Path | None = field(default=None, metadata={"help": "Data folder (default: LORALOOM_HOME)."})
    store_db_url: str | None = field(
        default=None, metadata={"help": "Store database URL (default: SQLite in the data folder)."}
    )
    s3_bucket: str | None = field(
        default=None, metadata={"help": "S3 bucket for adapter blobs (default: local folder)."}
    )
    s3_prefix: str = field(default="", metadata={"help": "Key prefix inside the S3 bucket."})
    s3_endpoint: str | None = field(
        default=None, metadata={"help": "S3-compatible endpoint URL (default: AWS)."}
    )
    s3_region: str | None = field(default=None, metadata={"help": "S3 region."})
    blob_cache_mb: int = field(default=2048, metadata={"help": "Local disk cache of S3 blobs in MiB."})
    max_upload_mb: int = field(default=1024, metadata={"help": "Largest adapter upload in MiB."})
    resolve_ttl_s: float = field(
        default=2.0,
        metadata={
            "help": "Seconds a resolved name or alias is reused before the database is asked again "
            "(other replicas' alias moves show within this; 0: ask every time)."
        },
    )

    @classmethod
    def from_env(cls, environ=None, **overrides) -> StoreSettings:
        return _from_env(cls, environ, **overrides)

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * MiB

    @property
    def root(self) -> Path:
        """The data folder: ``home``, else ``$LORALOOM_HOME`` or the platform's user data folder."""
        return self.home.expanduser() if self.home is not None else data_home()
