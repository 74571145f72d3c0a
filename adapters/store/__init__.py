"""The adapter store: every adapter version, metadata in SQL, bytes content-addressed by sha256.

store = AdapterStore.open()                      # the default store under LORALOOM_HOME
v = store.register("pixel-style", data, tags=["style"])
store.get("pixel-style@stable")
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
