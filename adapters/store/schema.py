"""The store's tables (SQLAlchemy Core). Alembic migrations in ``migrations/`` create them.

- ``adapters``: one row per name; ``last_version`` only grows, so a deleted
  version number is never reused while the name exists.
- ``blobs``: one row per stored sha256; the row is the lock that orders
  "a new version uses this blob" against "the last user went, remove it".
- ``versions``: immutable; a row exists only for a fully written, checked blob.
- ``version_tags`` and ``aliases`` hang off versions and names.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

NAME_LENGTH = 64

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

adapters = Table(
    "adapters",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(NAME_LENGTH), nullable=False, unique=True),
    Column("last_version", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

blobs = Table(
    "blobs",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("size_bytes", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

versions = Table(
    "versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("adapter_id", Integer, ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("sha256", String(64), ForeignKey("blobs.sha256"), nullable=False, index=True),
    Column("size_bytes", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("description", Text, nullable=False),
    Column("trigger_words", JSON, nullable=False),
    Column("base_architecture", String(128), nullable=False, index=True),
    Column("base_fingerprint", String(128), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("format", String(32), nullable=False),
    Column("components", JSON, nullable=False),
    Column("metadata", JSON, nullable=False),
    UniqueConstraint("adapter_id", "version"),
)

version_tags = Table(
    "version_tags",
    metadata,
    Column("version_id", Integer, ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True),
    Column("tag", String(NAME_LENGTH), primary_key=True),
    Index("ix_version_tags_tag", "tag"),
)

aliases = Table(
    "aliases",
    metadata,
    Column("adapter_id", Integer, ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True),
    Column("alias", String(NAME_LENGTH), primary_key=True),
    Column("version_id", Integer, ForeignKey("versions.id", ondelete="CASCADE"), nullable=False, index=True),
)
