from __future__ import annotations

import pytest

from adapters.blend import PartWeights
from adapters.errors import InvalidArgument
from server.engine.prompt import parse_prompt


def test_tags_become_the_blend_and_leave_the_text():
    parsed = parse_prompt("a cat <lora:ink:0.8>, on a hill <lora:neon@3:-0.25> <LORA:clay>")
    assert parsed.text == "a cat, on a hill"
    assert parsed.adapters == (("ink", 0.8), ("neon@3", -0.25), ("clay", 1.0))


def test_prompt_without_tags_is_unchanged():
    assert parse_prompt("a red fox, studio light").text == "a red fox, studio light"
    assert parse_prompt("a red fox").adapters == ()


def test_alias_refs_and_blank_weights():
    assert parse_prompt("<lora:ink@stable:> x").adapters == (("ink@stable", 1.0),)


@pytest.mark.parametrize(
    ("tag", "weight"),
    [
        ("<lora:ink:0.8:0.5>", PartWeights(0.8, 0.5)),  # A1111: text encoder, UNet
        ("<lora:ink:te=0.8:unet=0.5>", PartWeights(0.8, 0.5)),
        ("<lora:ink:0:1>", PartWeights(0.0, 1.0)),
        ("<lora:ink:0.8:unet=0.25>", PartWeights(0.8, 0.25)),
        ("<lora:ink:unet=0.5>", PartWeights(1.0, 0.5)),  # the text encoder keeps 1.0
        ("<lora:ink:te=0.5>", 0.5),  # A1111: the UNet takes the text encoder's weight
        ("<lora:ink:0.7:0.7>", 0.7),  # equal parts are the one weight
    ],
)
def test_per_part_weights(tag, weight):
    assert parse_prompt(f"a cat {tag}").adapters == (("ink", weight),)


@pytest.mark.parametrize(
    "prompt",
    [
        "<lora::0.5> a",
        "<lora:ink:heavy> a",
        "<lora:ink:0.5:0.2:0.1> a",
        "<lora:ink:nan>",
        "<lora:ink:te=0.5:0.2> a",
        "<lora:ink:dyn=4> a",
        "<lora:ink:te=1:te=2> a",
        "<lora:ink:0.5:inf> a",
    ],
)
def test_malformed_tags_are_refused(prompt):
    with pytest.raises(InvalidArgument):
        parse_prompt(prompt)
