"""The adapter store: every adapter version, metadata in SQL, bytes content-addressed by sha256.

The default store lives under LORALOOM_HOME (``AdapterStore.open()``); a server
validates uploads against its base model and may share a PostgreSQL database::

    store = AdapterStore.open(
        db_url="postgresql+psycopg://user:pw@db/loraloom",
        validator=make_validator(base.module_shapes, base.base_ref),
    )
    v = store.register("pixel-style", data, tags=["style"], aliases=["stable"])
    store.get("pixel-style@stable"), store.blob_path(v)
    store.load_version(v, module_names)  # bytes hashed as read; BlobDamaged (DATA_LOSS) if damaged
    store.verify()  # every version re-read the same way: the damaged ones, orphans, temp files

``db_url`` defaults to ``<home>/store/adapters.sqlite3``. ``open_store(StoreSettings.from_env())``
opens the store the ``LORALOOM_*`` variables describe (PostgreSQL, S3 blobs).
"""

# The names below load on first use, so ``adapters.store.settings`` (read by the CLI at start-up)
# costs no SQLAlchemy import.
_HOMES = {
    "BlobInfo": "adapters.store.blobs",
    "BlobStorage": "adapters.store.blobs",
    "LocalBlobStorage": "adapters.store.blobs",
    "AdapterFacts": "adapters.store.models",
    "AdapterPage": "adapters.store.models",
    "AdapterVersion": "adapters.store.models",
    "Damage": "adapters.store.models",
    "ResolvedVersion": "adapters.store.models",
    "VerifyReport": "adapters.store.models",
    "NAME_PATTERN": "adapters.store.names",
    "AdapterRef": "adapters.store.names",
    "check_alias": "adapters.store.names",
    "check_name": "adapters.store.names",
    "parse_ref": "adapters.store.names",
    "AdapterStore": "adapters.store.store",
    "StoreSettings": "adapters.store.settings",
    "open_store": "adapters.store.store",
    "Validator": "adapters.store.validation",
    "make_validator": "adapters.store.validation",
}


def __getattr__(name: str):
    import importlib

    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'adapters.store' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


__all__ = [
    "NAME_PATTERN",
    "AdapterFacts",
    "AdapterPage",
    "AdapterRef",
    "AdapterStore",
    "AdapterVersion",
    "BlobInfo",
    "BlobStorage",
    "Damage",
    "LocalBlobStorage",
    "ResolvedVersion",
    "StoreSettings",
    "Validator",
    "VerifyReport",
    "check_alias",
    "check_name",
    "make_validator",
    "open_store",
    "parse_ref",
]
