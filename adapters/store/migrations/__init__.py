"""Alembic migrations of the store's schema, run by ``adapters.store.db.upgrade`` on open."""
