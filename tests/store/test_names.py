"""Names, aliases and references: strict patterns, keys never paths."""

from __future__ import annotations

import pytest

from adapters.errors import InvalidArgument
from adapters.store.names import AdapterRef, check_alias, check_name, parse_ref


@pytest.mark.parametrize("name", ["a", "pixel-style", "cat_v2", "sd1.5-anime", "0abc", "a" * 64])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "A",
        "Pixel",
        "-a",
        ".a",
        "_a",
        "a" * 65,
        "../etc",
        "a/b",
        "a\\b",
        "a b",
        "é",
        "a\n",
        "a@1",
        None,
        3,
    ],
)
def test_invalid_names_are_refused_with_the_rule(name):
    with pytest.raises(InvalidArgument, match="a-z, 0-9"):
        check_name(name)


def test_refs():
    assert parse_ref("cat") == AdapterRef("cat")
    assert parse_ref("cat@3") == AdapterRef("cat", version=3)
    assert parse_ref("cat@stable") == AdapterRef("cat", alias="stable")
    assert parse_ref("cat@latest") == AdapterRef("cat")
    assert str(AdapterRef("cat", version=3)) == "cat@3"
    assert str(AdapterRef("cat", alias="stable")) == "cat@stable"


@pytest.mark.parametrize(
    "ref", ["cat@", "cat@0", "cat@03", "cat@-1", "cat@1@2", "cat@Stable", "@3", "cat@99999999999", "../x@1"]
)
def test_bad_refs(ref):
    with pytest.raises(InvalidArgument):
        parse_ref(ref)


@pytest.mark.parametrize("alias", ["3", "latest", "Stable", "", "a/b"])
def test_bad_aliases(alias):
    with pytest.raises(InvalidArgument):
        check_alias(alias)


def test_good_alias():
    assert check_alias("stable") == "stable"
    assert check_alias("2024-best") == "2024-best"
