"""Alembic environment: runs on the connection ``adapters.store.db.upgrade`` hands in.

The caller holds the schema lock and an open transaction; nothing here opens
its own engine or reads an ini file.
"""

from __future__ import annotations

from alembic import context

from adapters.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "the store's migrations run through adapters.store.db.upgrade(engine), not the alembic CLI; "
        "to add a revision, copy the newest file in versions/ and chain its down_revision"
    )

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
