"""The first schema: adapters, blobs, versions, version_tags, aliases.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("last_version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_adapters"),
        sa.UniqueConstraint("name", name="uq_adapters_name"),
    )
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_blobs"),
    )
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("adapter_id", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("trigger_words", sa.JSON, nullable=False),
        sa.Column("base_architecture", sa.String(128), nullable=False),
        sa.Column("base_fingerprint", sa.String(128), nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("components", sa.JSON, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_versions"),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], name="fk_versions_adapter_id_adapters", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["sha256"], ["blobs.sha256"], name="fk_versions_sha256_blobs"),
        sa.UniqueConstraint("adapter_id", "version", name="uq_versions_adapter_id_version"),
    )
    op.create_index("ix_versions_sha256", "versions", ["sha256"])
    op.create_index("ix_versions_base_architecture", "versions", ["base_architecture"])
    op.create_table(
        "version_tags",
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.Column("tag", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("version_id", "tag", name="pk_version_tags"),
        sa.ForeignKeyConstraint(
            ["version_id"], ["versions.id"], name="fk_version_tags_version_id_versions", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_version_tags_tag", "version_tags", ["tag"])
    op.create_table(
        "aliases",
        sa.Column("adapter_id", sa.Integer, nullable=False),
        sa.Column("alias", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("adapter_id", "alias", name="pk_aliases"),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], name="fk_aliases_adapter_id_adapters", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["version_id"], ["versions.id"], name="fk_aliases_version_id_versions", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_aliases_version_id", "aliases", ["version_id"])


def downgrade() -> None:
    op.drop_table("aliases")
    op.drop_table("version_tags")
    op.drop_table("versions")
    op.drop_table("blobs")
    op.drop_table("adapters")
