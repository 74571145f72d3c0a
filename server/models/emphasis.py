"""A1111's prompt emphasis and its 75-token chunks, as ``modules/prompt_parser.py`` and
``modules/sd_hijack_clip.py`` of stable-diffusion-webui read a prompt. Pure Python (no torch).

Syntax (:func:`parse_prompt_attention`):

- ``(words)`` multiplies the weight of ``words`` by 1.1, ``[words]`` divides it by 1.1,
  ``(words:1.3)`` multiplies it by 1.3; nesting multiplies (``((a))`` = 1.21);
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters;
- an unclosed ``(`` or ``[`` applies up to the end of the prompt; an unopened ``)`` or ``]`` is text;
- ``BREAK`` (a separate word, upper case) ends the current chunk: the pieces come back with a
  ``("BREAK", -1.0)`` piece between them.

Chunks (:func:`chunk_tokens`): the pieces' tokens (each piece tokenized on its own) fill chunks of
75; when a chunk is full and a comma came within its last 20 tokens, what follows the comma moves
to the next chunk. The text encoder reads each chunk wrapped in its start and end tokens (77 ids),
one chunk at a time; the chunks' states are concatenated.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from adapters.errors import InvalidArgument

BREAK = "BREAK"
BREAK_WEIGHT = -1.0
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
CHUNK_LENGTH = 75  # tokens per chunk, besides the start and end tokens
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default

# A1111's re_attention (1.7+, which allows spaces around the weight), token by token.
_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)

Piece = tuple[str, float]


def parse_prompt_attention(text: str) -> list[Piece]:
    """``text`` as ``(text, weight)`` pieces, exactly as A1111's ``parse_prompt_attention``.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]

    A weight that is not a number (``(a:.)``, ``(a:1.2.3)``) raises ``InvalidArgument`` (A1111
    fails on it too).
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for position in range(start, len(res)):
            res[position][1] *= multiplier

    for match in _ATTENTION.finditer(text):
        part, weight = match.group(0), match.group(1)
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_brackets.append(len(res))
        elif part == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), _weight(weight, part))
        elif part == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_MULTIPLIER)
        elif part == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_MULTIPLIER)
        else:
            for index, piece in enumerate(_BREAK.split(part)):
                if index > 0:
                    res.append([BREAK, BREAK_WEIGHT])
                res.append([piece, 1.0])

    for position in round_brackets:
        multiply_range(position, ROUND_MULTIPLIER)
    for position in square_brackets:
        multiply_range(position, SQUARE_MULTIPLIER)
    if not res:
        res = [["", 1.0]]
    # merge runs of identical weights
    index = 0
    while index + 1 < len(res):
        if res[index][1] == res[index + 1][1]:
            res[index][0] += res[index + 1][0]
            res.pop(index + 1)
        else:
            index += 1
    return [(str(piece), float(weight)) for piece, weight in res]


def _weight(number: str, part: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise InvalidArgument(
            f"prompt emphasis {part!r} has no valid weight: write (words:1.2), "
            "or \\( \\) for literal brackets"
        ) from None


def is_plain(pieces: Sequence[Piece]) -> bool:
    """Whether ``pieces`` is text with no emphasis and no ``BREAK`` (one piece of weight 1)."""
    return len(pieces) == 1 and pieces[0][1] == 1.0


@dataclass
class Chunk:
    """Up to :data:`CHUNK_LENGTH` token ids and their weights (without start, end or padding)."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunk_tokens(
    pieces: Sequence[Piece],
    piece_tokens: Sequence[Sequence[int]],
    *,
    comma: int | None,
    length: int = CHUNK_LENGTH,
    backtrack: int = COMMA_BACKTRACK,
) -> list[Chunk]:
    """The chunks the pieces' tokens fill, as A1111's ``tokenize_line`` (without textual inversion).

    ``piece_tokens[i]`` are the ids of ``pieces[i]``'s text (no start or end token); ``comma`` the
    id of ``,`` (``None``: no comma backtracking). A ``BREAK`` piece ends the chunk it is in (an
    empty chunk too); a prompt with no tokens is one empty chunk.
    """
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def next_chunk() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk = Chunk()
        last_comma = -1

    for tokens, (text, weight) in zip(piece_tokens, pieces, strict=True):
        if text == BREAK and weight == BREAK_WEIGHT:
            next_chunk()
            continue
        for token in tokens:
            if comma is not None and token == comma:
                last_comma = len(chunk.tokens)
            # A full chunk with a comma among its last `backtrack` tokens: what follows the comma
            # moves to the next chunk.
            elif (
                backtrack
                and len(chunk.tokens) == length
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= backtrack
            ):
                cut = last_comma + 1
                moved = Chunk(chunk.tokens[cut:], chunk.weights[cut:])
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                next_chunk()
                chunk = moved
            if len(chunk.tokens) == length:
                next_chunk()
            chunk.tokens.append(token)
            chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        next_chunk()
    return chunks


def prompt_chunks(
    text: str,
    tokenize: Callable[[list[str]], Sequence[Sequence[int]]],
    *,
    comma: int | None,
    length: int = CHUNK_LENGTH,
) -> list[Chunk]:
    """``text`` parsed (:func:`parse_prompt_attention`), tokenized piece by piece with ``tokenize``
    (texts -> ids without special tokens) and cut into chunks (:func:`chunk_tokens`)."""
    pieces = parse_prompt_attention(text)
    return chunk_tokens(pieces, tokenize([piece for piece, _ in pieces]), comma=comma, length=length)
