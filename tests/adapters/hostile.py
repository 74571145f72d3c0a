"""Hostile and broken ``.safetensors`` bytes, as hypothesis strategies and plain builders.

Shared by the parser's property tests (``tests/adapters/test_safeparse_fuzz.py``) and the
API's (``tests/api/test_hostile_fuzz.py``, which uploads them). The strategies draw few
choices per example (``sampled_from`` over prepared odd values rather than deep recursive
strategies), so thousands of examples run in seconds on a 2-core machine.
"""

from __future__ import annotations

import json
import struct

import torch
from hypothesis import strategies as st

from adapters.safeparse import FLOAT_DTYPES, SCALAR_INT_DTYPES, write_safetensors

ITEMSIZE = {name: size for name, (_, size) in {**FLOAT_DTYPES, **SCALAR_INT_DTYPES}.items()}


def frame(header: bytes, data: bytes = b"") -> bytes:
    """A safetensors file: 8-byte little-endian header length, the header, the data."""
    return struct.pack("<Q", len(header)) + header + data


# Strategies draw few choices per example (sampled_from over prepared odd values, not deep
# recursive strategies): over 10,000 examples must run in seconds on a busy 2-core machine.
ODD_NAMES = [
    "a",
    "a.lora_up.weight",
    "a.alpha",
    "__metadata__",
    "dtype",
    "shape",
    "data_offsets",
    "",
    " ",
    "\x00",
    '"',
    "\\",
    "{}",
    "[",
    "é",
    "字",
    "🙂",
    "\u2028",
    "a" * 512,
    "a" * 513,
    "__proto__",
]
odd_text = st.one_of(st.sampled_from(ODD_NAMES), st.text(max_size=4))
BIG_NUMBERS = [2**31, 2**32 - 1, 2**53 + 1, 2**63, 2**64 - 1, 2**64, 10**30, 10**300, -1, -(2**63)]
dims = st.one_of(st.integers(0, 5), st.sampled_from(BIG_NUMBERS), st.integers(-(2**65), 2**65))
JSON_ODDITIES = [
    None,
    True,
    False,
    0,
    -0.0,
    1.5,
    1e308,
    -1,
    2**64,
    10**400,
    "",
    "F32",
    "x" * 300,
    [],
    [[]],
    [[1]],
    [1, 2, 3, 4, 5],
    [0, "1"],
    [True],
    [None],
    [1.0],
    [[[[[[[[0]]]]]]]],
    {},
    {"a": 1},
    {"dtype": "F32"},
    {"F32": 4},
    {"": {"": {"": []}}},
]
json_values = st.one_of(st.sampled_from(JSON_ODDITIES), dims, odd_text)
# JSON text spliced into a header as is: literals json.dumps never writes.
raw_literals = st.sampled_from(
    [
        "NaN",
        "Infinity",
        "-Infinity",
        "1e999",
        "-0",
        "0.0",
        "1.0",
        "true",
        "null",
        '"\\ud800"',
        '"\\udfff\\ud800"',
        "9" * 5000,
        "[" * 3000 + "]" * 3000,
        "{}",
        "[]",
        '""',
        "[1,]",
        "01",
        "+1",
    ]
)


def byte_size(dtype: object, shape: object) -> int | None:
    """Bytes a (dtype, shape) needs, when both are sane enough to compute it cheaply."""
    if not isinstance(dtype, str) or dtype not in ITEMSIZE or not isinstance(shape, list):
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 64 for d in shape):
        return None
    count = 1
    for d in shape:
        count *= d
    return count * ITEMSIZE[dtype]


DTYPES = ["F16", "BF16", "F32", "I32", "I64", "F64", "U8", "I8", "BOOL", "F8_E4M3", "f32", "", "F32 "]
SHAPES = [
    [],
    [0],
    [1],
    [2],
    [3, 2],
    [2, 0, 4],
    [1, 1, 1, 1],
    [1, 1, 1, 1, 1],
    [-1],
    [-1, -1],
    [2**31, 2],
    [2**32, 2**32],
    [2**64],
    [10**30, 0],
    [True],
    [1.0],
    ["1"],
    [None],
    [[1]],
]
# One draw picks a (dtype, shape) pair: sound ones mostly, odd JSON in either place at times.
KINDS = (
    [(dtype, shape) for dtype in DTYPES for shape in SHAPES]
    + [(odd, shape) for odd in JSON_ODDITIES for shape in ([1], [2, 2])]
    + [(dtype, odd) for odd in JSON_ODDITIES for dtype in ("F32", "I64")]
)
SOUND_KINDS = [
    (dtype, shape)
    for dtype, shape in KINDS
    if byte_size(dtype, shape) is not None
    and len(shape) <= 4
    and (dtype[0] in "FB" or byte_size(dtype, shape) <= 8)
]
kinds = st.one_of(st.sampled_from(SOUND_KINDS), st.sampled_from(SOUND_KINDS), st.sampled_from(KINDS))


@st.composite
def headers(draw) -> bytes:
    """A whole file: a header of odd tensor entries and metadata, data bytes, then a mutation."""
    ascii_only = draw(st.booleans())
    entries: list[tuple[str, str]] = []  # (key, JSON value text): keys may repeat
    offset = 0
    for _ in range(draw(st.integers(0, 4))):
        name, (dtype, shape) = draw(odd_text), draw(kinds)
        if any(name == seen for seen, _ in entries):
            name += f".{len(entries)}"  # repeated keys come from twist 15
        size = byte_size(dtype, shape)
        twist = draw(st.integers(0, 15))  # 0..9: a sound entry; 10..15: one thing wrong with it
        if twist == 10 or size is None:
            offsets: object = draw(st.one_of(st.lists(dims, min_size=2, max_size=2), json_values))
        elif twist == 11:  # a gap or an overlap
            shift = draw(st.sampled_from([-8, -4, -1, 1, 2, 8]))
            offsets = [max(offset + shift, 0), max(offset + shift, 0) + size]
            offset = offsets[1]
        else:
            offsets = [offset, offset + size]
            offset += size
        entry: dict[str, object] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if twist == 12:
            entry[draw(odd_text)] = draw(json_values)  # an extra (or overwritten) key
        elif twist == 13:
            del entry[draw(st.sampled_from(sorted(entry)))]
        text = json.dumps(entry, ensure_ascii=ascii_only)
        if twist == 14:  # a literal in place of the shape
            text = text.replace(json.dumps(shape, ensure_ascii=ascii_only), draw(raw_literals), 1)
        entries.append((name, text))
        if twist == 15:
            entries.append((name, text))  # a repeated key
    metadata_kind = draw(st.integers(0, 5))
    if metadata_kind in (1, 2):
        metadata = draw(st.dictionaries(odd_text, odd_text, max_size=3))
        entries.insert(draw(st.integers(0, len(entries))), ("__metadata__", json.dumps(metadata)))
    elif metadata_kind == 3:
        entries.append(("__metadata__", json.dumps(draw(json_values))))
    elif metadata_kind == 4:
        entries.append(("__metadata__", '{"k": ' + draw(raw_literals) + "}"))
    body = ",".join(f"{json.dumps(key, ensure_ascii=ascii_only)}:{value}" for key, value in entries)
    header = ("{" + body + "}").encode("utf-8", "surrogatepass")
    header += b" " * draw(st.sampled_from([0, 0, -len(header) % 8, 3]))
    data_size = max(offset + draw(st.sampled_from([0] * 12 + [-1, 1, 7])), 0)
    data = draw(st.sampled_from([bytes(data_size), b"\x7f" * data_size, b"\xff" * data_size]))
    return draw(mutated(frame(header, data)))


@st.composite
def mutated(draw, file: bytes) -> bytes:
    """``file`` as it is, or broken: truncated, bytes flipped or inserted, a wrong length field."""
    kind = draw(st.sampled_from(["same"] * 7 + ["truncate", "flip", "insert", "length", "prefix"]))
    if kind == "truncate":
        return file[: draw(st.integers(0, max(len(file) - 1, 0)))]
    if kind == "flip" and file:
        position = draw(st.integers(0, len(file) - 1))
        return file[:position] + bytes([draw(st.integers(0, 255))]) + file[position + 1 :]
    if kind == "insert":
        position = draw(st.integers(0, len(file)))
        return file[:position] + draw(st.binary(min_size=1, max_size=8)) + file[position:]
    if kind == "length" and len(file) >= 8:
        length = draw(st.one_of(st.integers(0, len(file) + 8), st.integers(0, 2**64 - 1)))
        return struct.pack("<Q", length) + file[8:]
    if kind == "prefix":  # the magic of a pickle or zip in front of it
        return draw(st.sampled_from([b"\x80\x02", b"\x80\x05", b"PK\x03\x04", b"PK\x05\x06", b"{"])) + file
    return file


def valid_file(kind: int, values: list[float]) -> bytes:
    """A small valid file of one of a few layouts (float dtypes, an int64 alpha, an empty tensor)."""
    floats = torch.tensor(values or [0.0], dtype=torch.float32)
    tensors = {
        0: {"a.lora_down.weight": floats.reshape(1, -1)},
        1: {"a.lora_up.weight": floats.to(torch.float16), "a.alpha": torch.tensor(4, dtype=torch.int64)},
        2: {"b": floats.to(torch.bfloat16).reshape(-1, 1), "c": torch.zeros(0, 3), "d": floats[:1]},
        3: {"e": torch.tensor([1], dtype=torch.int32)},
    }[kind]
    return write_safetensors(tensors, {"ss_network_dim": "4", "format": "pt"} if kind % 2 else None)


# Text of JSON's own characters after a sound length field: reaches the JSON and structure checks.
jsonish = st.text(alphabet='{}[]":,0123456789.-eE ntrufalsNIy\\', max_size=40).map(
    lambda tail: frame(("{" + tail).encode())
)


KOHYA_NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q_%d.lora_down.weight"


def million_tensor_header(count: int = 1_000_000, name: str = "t%d") -> bytes:
    """A header declaring ``count`` zero-size tensors (a valid layout: every range is [0, 0]),
    named ``name % index`` (``KOHYA_NAME``: about 144 bytes a tensor, as long as real names)."""
    entry = '"' + name + '":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    return ("{" + ",".join(entry % i for i in range(count)) + "}").encode()
