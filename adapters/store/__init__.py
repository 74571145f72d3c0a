"""The adapter store: every adapter version, metadata in SQL, bytes content-addressed by sha256.

The default store lives under LORALOOM_HOME (``AdapterStore.open()``); a server
validates uploads against its base model and may share a PostgreSQL database::

    store = AdapterStore.open(
        db_url="postgresql+psycopg://user:pw@db/loraloom",
        validator=make_validator(base.module_shapes, base.base_ref),
    )
    v = store.register("pixel-style", data, tags=["style"], aliases=["stable"])
    store.get("pixel-style@stable"), store.blob_path(v)

``db_url`` defaults to ``$LORALOOM_STORE_DB_URL``, then ``<home>/store/adapters.sqlite3``.
"""

from adapters.store.blobs import BlobInfo, BlobStorage, LocalBlobStorage
from adapters.store.models import AdapterFacts, AdapterPage, AdapterVersion, VerifyReport
from adapters.store.names import NAME_PATTERN, AdapterRef, check_alias, check_name, parse_ref
from adapters.store.store import AdapterStore
from adapters.store.validation import Validator, make_validator

__all__ = [
    "NAME_PATTERN",
    "AdapterFacts",
    "AdapterPage",
    "AdapterRef",
    "AdapterStore",
    "AdapterVersion",
    "BlobInfo",
    "BlobStorage",
    "LocalBlobStorage",
    "Validator",
    "VerifyReport",
    "check_alias",
    "check_name",
    "make_validator",
    "parse_ref",
]
