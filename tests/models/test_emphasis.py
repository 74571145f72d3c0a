"""A1111's emphasis parser and chunking (server.models.emphasis): pure Python, no model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.errors import InvalidArgument
from server.models.emphasis import (
    BREAK,
    CHUNK_LENGTH,
    Chunk,
    chunk_tokens,
    is_plain,
    parse_prompt_attention,
    prompt_chunks,
)

# stable-diffusion-webui's own doctests of modules/prompt_parser.py::parse_prompt_attention.
A1111_DOCTESTS = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ["a ", 1.0],
            ["house", 1.5730000000000004],
            [" ", 1.1],
            ["on", 1.0],
            [" a ", 1.1],
            ["hill", 0.55],
            [", sun, ", 1.1],
            ["sky", 1.4641000000000006],
            [".", 1.1],
        ],
    ),
]


def as_lists(pieces):
    return [[text, weight] for text, weight in pieces]


@pytest.mark.parametrize(("text", "expected"), A1111_DOCTESTS)
def test_parses_as_a1111s_own_doctests(text, expected):
    assert as_lists(parse_prompt_attention(text)) == expected  # exact floats, A1111's products


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a (b:1.5) c", [["a ", 1.0], ["b", 1.5], [" c", 1.0]]),
        ("((a))", [["a", 1.1 * 1.1]]),
        ("[a]", [["a", 1 / 1.1]]),
        ("[[a]]", [["a", (1 / 1.1) * (1 / 1.1)]]),
        ("([a])", [["a", 1 / 1.1 * 1.1]]),
        ("((a:2))", [["a", 2 * 1.1]]),
        ("(a:-0.5)", [["a", -0.5]]),
        ("(a : 1.5 )", [["a ", 1.5]]),  # spaces around the weight (A1111 1.7+)
        ("(a:.5)", [["a", 0.5]]),
        ("[a:1.5]", [["a:1.5", 1 / 1.1]]),  # a weight only closes a round bracket
        ("a:b", [["a:b", 1.0]]),
        ("unopened) and]", [["unopened) and]", 1.0]]),
        ("[unclosed", [["unclosed", 1 / 1.1]]),
        ("(a [b) c]", [["a ", 1.1], ["b", 1.0], [" c", 1 / 1.1]]),  # a1111 closes by kind, not order
        ("\\(a\\) \\[b\\]", [["(a) [b]", 1.0]]),
        ("back\\\\slash", [["back\\slash", 1.0]]),
        ("lone\\slash", [["loneslash", 1.0]]),  # a lone backslash is dropped, as in A1111
        ("", [["", 1.0]]),
        ("()", [["", 1.0]]),
    ],
)
def test_weights_nest_multiply_and_escape(text, expected):
    pieces = parse_prompt_attention(text)
    assert [piece for piece, _ in pieces] == [piece for piece, _ in expected]
    assert [weight for _, weight in pieces] == pytest.approx([weight for _, weight in expected])


def test_break_is_a_piece_of_weight_minus_one_between_its_neighbours():
    assert as_lists(parse_prompt_attention("a cat BREAK a dog")) == [
        ["a cat", 1.0],
        ["BREAK", -1.0],
        ["a dog", 1.0],
    ]
    assert as_lists(parse_prompt_attention("a (cat) BREAK dog")) == [
        ["a ", 1.0],
        ["cat", 1.1],
        ["", 1.0],
        ["BREAK", -1.0],
        ["dog", 1.0],
    ]
    # Only the upper-case word: "break" and "BREAKS" are text.
    assert parse_prompt_attention("break BREAKS") == [("break BREAKS", 1.0)]


def test_a_weight_that_is_not_a_number_is_refused():
    for text in ("(a:.)", "(a:1.2.3)", "(a:+.)"):
        with pytest.raises(InvalidArgument, match="valid weight"):
            parse_prompt_attention(text)


@given(st.text(alphabet="abcxyz ,.!?-'0123456789é", max_size=60))
def test_text_without_syntax_is_one_plain_piece(text):
    pieces = parse_prompt_attention(text)
    assert pieces == [(text, 1.0)] and is_plain(pieces)


@given(st.text(alphabet="ab ()[]:.15\\", max_size=40))
def test_any_bracket_soup_parses_or_names_its_bad_weight(text):
    try:
        pieces = parse_prompt_attention(text)
    except InvalidArgument:
        return
    assert pieces and all(isinstance(t, str) and isinstance(w, float) for t, w in pieces)
    assert all(pieces[i][1] != pieces[i + 1][1] for i in range(len(pieces) - 1))  # runs merged


# ------------------------------------------------------------------ chunks

COMMA = 9


def chunks_of(pieces, tokens, **kwargs):
    return [(chunk.tokens, chunk.weights) for chunk in chunk_tokens(pieces, tokens, comma=COMMA, **kwargs)]


def test_tokens_fill_chunks_of_75_with_their_weights():
    ids = list(range(100, 260))  # 160 tokens: 75 + 75 + 10
    chunks = chunks_of([("x", 1.5)], [ids])
    assert [len(tokens) for tokens, _ in chunks] == [75, 75, 10]
    assert [token for tokens, _ in chunks for token in tokens] == ids
    assert all(weights == [1.5] * len(tokens) for tokens, weights in chunks)


def test_exactly_75_tokens_is_one_chunk_and_nothing_is_one_empty_chunk():
    assert len(chunks_of([("x", 1.0)], [list(range(CHUNK_LENGTH))])) == 1
    assert len(chunks_of([("x", 1.0)], [list(range(CHUNK_LENGTH + 1))])) == 2
    assert chunks_of([("", 1.0)], [[]]) == [([], [])]


def test_a_full_chunk_ends_at_a_comma_within_20_tokens_as_a1111():
    ids = [1] * 60 + [COMMA] + [2] * 30  # the comma at 60: 15 tokens before the chunk is full
    first, second = chunks_of([("x", 1.0)], [ids])
    assert first[0] == [1] * 60 + [COMMA]
    assert second[0] == [2] * 30
    far = [1] * 40 + [COMMA] + [2] * 50  # the comma 35 tokens back: no backtracking
    first, second = chunks_of([("x", 1.0)], [far])
    assert len(first[0]) == 75 and second[0] == [2] * 16
    first, second = chunks_of([("x", 1.0)], [ids], backtrack=0)
    assert len(first[0]) == 75


def test_break_starts_a_new_chunk_even_an_empty_one():
    pieces = [("a", 1.0), (BREAK, -1.0), ("b", 1.2)]
    assert chunks_of(pieces, [[5, 6], [77], [7]]) == [([5, 6], [1.0, 1.0]), ([7], [1.2])]
    pieces = [("", 1.0), (BREAK, -1.0), ("b", 1.0)]
    assert chunks_of(pieces, [[], [77], [7]]) == [([], []), ([7], [1.0])]


def test_prompt_chunks_tokenizes_each_piece_on_its_own():
    seen = []

    def tokenize(texts):
        seen.extend(texts)
        return [[len(text)] * len(text.split()) for text in texts]

    chunks = prompt_chunks("a b (c d:1.5) BREAK e", tokenize, comma=None)
    assert seen == ["a b ", "c d", "", "BREAK", "e"]
    assert chunks == [Chunk([4, 4, 3, 3], [1.0, 1.0, 1.5, 1.5]), Chunk([1], [1.0])]
