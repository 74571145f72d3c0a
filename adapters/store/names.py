"""Adapter names, aliases, tags and references (``name``, ``name@3``, ``name@alias``).

Names are keys in the metadata database, never paths: blobs are stored by
sha256 alone, so no name can reach the file system.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapters.errors import InvalidArgument

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(r"[1-9][0-9]{0,9}")
_DIGITS = re.compile(r"[0-9]+")

# ``name@latest`` always means the newest version; it cannot be set as an alias.
LATEST = "latest"
MAX_VERSION = 2**31 - 1


SHOWN_CHARS = 40


def excerpt(value: object) -> str:
    """``repr(value)``, cut to a few dozen characters: error messages travel in gRPC trailers (8 KiB)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def check_name(name: object, what: str = "adapter name") -> str:
    """Return ``name`` if it matches NAME_PATTERN, else raise InvalidArgument."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid {what} {excerpt(name)}: use 1-64 characters from a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit (for example 'pixel-style' or 'cat_v2')"
        )
    return name


def check_alias(alias: object) -> str:
    """An alias follows the name pattern, is not all digits (that is a version) and is not 'latest'."""
    check_name(alias, "alias")
    assert isinstance(alias, str)
    if _DIGITS.fullmatch(alias):
        raise InvalidArgument(
            f"invalid alias {alias!r}: an alias cannot be all digits, '@{alias}' would mean version {alias}"
        )
    if alias == LATEST:
        raise InvalidArgument("invalid alias 'latest': 'name@latest' always means the newest version")
    return alias


def check_tag(tag: object) -> str:
    return check_name(tag, "tag")


def check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise InvalidArgument(f"invalid version {excerpt(version)}: versions are integers from 1")
    return version


@dataclass(frozen=True)
class AdapterRef:
    """A parsed reference: a name and at most one of a version or an alias (neither: the newest)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def parse_ref(ref: str) -> AdapterRef:
    """Parse ``name``, ``name@3``, ``name@alias`` or ``name@latest``."""
    if not isinstance(ref, str):
        raise InvalidArgument(
            f"invalid adapter reference {excerpt(ref)}: expected 'name', 'name@3' or 'name@alias'"
        )
    name, sep, selector = ref.partition("@")
    check_name(name)
    if not sep:
        return AdapterRef(name)
    if _DIGITS.fullmatch(selector):
        if not _VERSION.fullmatch(selector) or int(selector) > MAX_VERSION:
            raise InvalidArgument(
                f"invalid version in {excerpt(ref)}: versions are integers from 1 without leading zeros"
            )
        return AdapterRef(name, version=int(selector))
    if selector == LATEST:
        return AdapterRef(name)
    if not _NAME.fullmatch(selector):
        raise InvalidArgument(
            f"invalid adapter reference {excerpt(ref)}: after '@' put a version number or an alias "
            "(for example 'pixel-style@3' or 'pixel-style@stable')"
        )
    return AdapterRef(name, alias=selector)
