"""Read ``.safetensors`` files that may come from anyone, safely.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of
JSON (``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}}``)
and the tensor data. Every structural check runs on the header alone, before a
single tensor byte is read, so a hostile or broken file is refused in
milliseconds with memory bounded by ``ParseLimits.max_header_bytes``:

- the header length is bounded and fits inside the file;
- the header is a JSON object with no duplicate keys (at any depth), no
  NaN/Infinity literals and no lone UTF-16 surrogate escapes (``"\\ud800"``: not
  text, and not encodable as UTF-8 on the wire); metadata is a flat ``str -> str`` map;
- every dtype is on an allow-list (F16, BF16, F32; integer dtypes only for
  single-element tensors, because diffusers' ``convert_state_dict_to_kohya`` and
  other converters write ``alpha`` as an int64 scalar);
- shapes are lists of non-negative ints with a bounded number of dims; element
  counts are computed with Python integers (no overflow) and bounded;
- each tensor's byte range matches its shape, ranges are contiguous from 0,
  and the last one ends exactly at the end of the file (no trailing bytes);
- the number of tensors is bounded.

Before the JSON is parsed, a header with more objects, arrays and commas than
``max_tensors`` entries need is refused, so parsing costs a bounded multiple of
the header's size (a few times ``max_header_bytes`` at worst, not 30 times).
After reading, every floating-point tensor must be finite. A PyTorch pickle
(zip archive or raw pickle protocol) is recognised and refused with a note on
converting it offline: nothing here ever unpickles.

Every refusal is an ``AdapterInvalid`` (never another exception type, whatever the
bytes), and its message quotes the file only in short excerpts: it reaches the
uploader in a gRPC status, whose trailers are small.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import reprlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from adapters.errors import AdapterInvalid

METADATA_KEY = "__metadata__"

# dtype name -> (torch dtype, item size in bytes)
FLOAT_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
}
# Accepted only for tensors of at most one element (an ``alpha`` scalar).
SCALAR_INT_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "I32": (torch.int32, 4),
    "I64": (torch.int64, 8),
}

CONVERT_HINT = (
    "loraloom never unpickles files. Convert it offline, on a machine you trust, with e.g. "
    '`python -c "import torch, safetensors.torch as s; '
    "s.save_file(torch.load('in.pt', weights_only=True), 'out.safetensors')\"` "
    "(or kohya's / diffusers' conversion scripts), then upload the .safetensors file."
)


@dataclass(frozen=True)
class ParseLimits:
    """Bounds the pre-check enforces; the defaults fit any real SD 1.x / SDXL LoRA."""

    max_header_bytes: int = 16 * 1024 * 1024
    max_file_bytes: int = 4 * 1024**3
    max_tensors: int = 65_536
    max_dims: int = 4
    max_tensor_elements: int = 1 << 31
    max_name_chars: int = 512


DEFAULT_LIMITS = ParseLimits()

# Values from the file appear in messages only this short (names, keys, dtypes, shapes, numbers).
_EXCERPT = reprlib.Repr()
_EXCERPT.maxstring = 80
_EXCERPT.maxother = 80
_EXCERPT.maxlong = 24
_EXCERPT.maxlevel = 2
_EXCERPT.maxlist = _EXCERPT.maxdict = 6
# A ``\uD800``..``\uDFFF`` escape in the header text: the only way a lone surrogate gets in.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _shown(value: object) -> str:
    """``value`` (read from the file) for a message: a repr of bounded length, however long,
    deep or large the value is."""
    return _EXCERPT.repr(value)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header declares it; ``begin``/``end`` are offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The checked header of a file: its tensors (in data order) and its metadata."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    header_bytes: int = 0
    data_bytes: int = 0


Source = bytes | bytearray | memoryview | str | os.PathLike


def peek_header(source: Source, limits: ParseLimits = DEFAULT_LIMITS) -> SafetensorsHeader:
    """Run the whole pre-check and return the header, reading no tensor data."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = memoryview(source)
        return _check_header(data[:9].tobytes(), lambda n: data[8 : 8 + n].tobytes(), len(data), limits)
    with open(os.fspath(source), "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        prefix = fh.read(9)

        def read_header(n: int) -> bytes:
            fh.seek(8)
            return fh.read(n)

        return _check_header(prefix, read_header, size, limits)


def read_safetensors(
    source: Source, limits: ParseLimits = DEFAULT_LIMITS
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Pre-check, then read every tensor and refuse non-finite values.

    Returns ``(tensors, metadata)``. The data section is read once into one private buffer
    (a file: ``readinto``, no intermediate ``bytes``; ``bytes``: one copy) and the tensors are
    views on it, not copies: at SD 1.5 size a LoRA is 75 MB, and two more copies of it
    (``read`` then ``bytearray``, then a clone per tensor) were most of its load time. A
    ``bytearray`` passed in (the store's checked read) is used in place: its owner must not
    write to it afterwards. A tensor whose bytes are not aligned to its element size (a
    writer that did not pad its header) is copied instead. The finiteness check runs once
    per run of consecutive tensors of one float dtype, not once per tensor.
    """
    header = peek_header(source, limits)
    start = 8 + header.header_bytes
    payload: bytearray | memoryview
    if isinstance(source, bytearray):
        payload = memoryview(source)[start : start + header.data_bytes]
    elif isinstance(source, bytes | memoryview):
        payload = bytearray(memoryview(source)[start : start + header.data_bytes])
    else:
        payload = _read_section(source, start, header.data_bytes)
    infos = sorted(header.tensors.values(), key=lambda info: info.begin)
    _check_finite(payload, infos)
    aligned = _address(payload) if len(payload) else 0
    tensors = {info.name: _materialize(payload, info, aligned) for info in header.tensors.values()}
    return tensors, dict(header.metadata)


def _read_section(path: str | os.PathLike, start: int, size: int) -> bytearray:
    """``size`` bytes of the file from ``start``, read straight into one new buffer."""
    payload = bytearray(size)
    view = memoryview(payload)
    filled = 0
    try:
        with open(os.fspath(path), "rb") as fh:
            fh.seek(start)
            while filled < size:
                count = fh.readinto(view[filled:])
                if not count:
                    break
                filled += count
            grew = bool(fh.read(1))
    finally:
        view.release()
    if filled != size or grew:
        raise AdapterInvalid("the file changed size while it was being read; upload it again")
    return payload


def _address(payload: bytearray | memoryview) -> int:
    """The address of the payload's first byte (alignment of views on it)."""
    return torch.frombuffer(payload, dtype=torch.uint8, count=1).data_ptr()


def _check_finite(payload: bytearray | memoryview, infos: list[TensorInfo]) -> None:
    """Refuse a NaN or Inf in any float tensor; ``infos`` in data order (contiguous ranges)."""
    run: list[TensorInfo] = []

    def flush() -> None:
        if not run:
            return
        torch_dtype, itemsize = _dtype_table(run[0].dtype)
        count = (run[-1].end - run[0].begin) // itemsize
        values = torch.frombuffer(payload, dtype=torch_dtype, count=count, offset=run[0].begin)
        if not bool(torch.isfinite(values).all()):
            for info in run:
                _refuse_non_finite(values[(info.begin - run[0].begin) // itemsize :][: info.numel], info)
        run.clear()

    for info in infos:
        if info.dtype not in FLOAT_DTYPES or info.numel == 0:
            continue
        if run and (info.dtype != run[0].dtype or info.begin != run[-1].end):
            flush()
        run.append(info)
    flush()


def _refuse_non_finite(values: torch.Tensor, info: TensorInfo) -> None:
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise AdapterInvalid(
            f"tensor {_shown(info.name)} holds {bad} non-finite value(s) (NaN or Inf); the adapter is "
            "corrupt or its training diverged; retrain or re-export it"
        )


def _materialize(payload: bytearray | memoryview, info: TensorInfo, address: int) -> torch.Tensor:
    """A view of ``info``'s bytes (a copy when they are not aligned to the element size)."""
    torch_dtype, itemsize = _dtype_table(info.dtype)
    if info.numel == 0:
        return torch.empty(info.shape, dtype=torch_dtype)
    tensor = torch.frombuffer(payload, dtype=torch_dtype, count=info.numel, offset=info.begin)
    if (address + info.begin) % itemsize:
        tensor = tensor.clone()
    return tensor.reshape(info.shape)


def _dtype_table(name: str) -> tuple[torch.dtype, int]:
    return FLOAT_DTYPES.get(name) or SCALAR_INT_DTYPES[name]


def sniff_pickle(prefix: bytes) -> str | None:
    """Name the pickle-based format a file starts with, or ``None``."""
    if prefix.startswith(b"PK\x03\x04") or prefix.startswith(b"PK\x05\x06"):
        return "a zip archive (the PyTorch .pt/.ckpt/.bin checkpoint format, which holds a pickle)"
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return f"a Python pickle (protocol {prefix[1]}, the legacy PyTorch checkpoint format)"
    return None


def _check_header(prefix: bytes, read_header, file_size: int, limits: ParseLimits) -> SafetensorsHeader:
    """``prefix`` is the first 9 bytes: the header length and the header's first byte."""
    plausible = (
        len(prefix) == 9 and prefix[8:9] == b"{" and struct.unpack("<Q", prefix[:8])[0] <= file_size - 8
    )
    kind = None if plausible else sniff_pickle(prefix)
    if kind is not None:
        raise AdapterInvalid(f"this file is {kind}, not safetensors. {CONVERT_HINT}")
    if len(prefix) < 8:
        raise AdapterInvalid(
            f"not a safetensors file: {file_size} byte(s), shorter than the 8-byte header length"
        )
    if file_size > limits.max_file_bytes:
        raise AdapterInvalid(
            f"file is {file_size} bytes, more than the {limits.max_file_bytes}-byte limit for an adapter"
        )
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > limits.max_header_bytes:
        raise AdapterInvalid(
            f"safetensors header declares {header_len} bytes, more than the "
            f"{limits.max_header_bytes}-byte limit; the file is corrupt or not safetensors"
        )
    if 8 + header_len > file_size:
        raise AdapterInvalid(
            f"safetensors header declares {header_len} bytes but the file has only "
            f"{file_size - 8} after the length field; the file is truncated"
        )
    if header_len < 2:
        raise AdapterInvalid("safetensors header is empty; the file is corrupt")
    raw = read_header(header_len)
    if not raw.startswith(b"{"):
        raise AdapterInvalid(
            "safetensors header does not start with '{'; the file is corrupt or not safetensors"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterInvalid(f"safetensors header is not valid UTF-8 (byte {exc.start})") from None
    # A cheap upper bound before JSON parsing, so a huge tensor table costs no parse time.
    declared = raw.count(b'"data_offsets"')
    if declared > limits.max_tensors:
        raise AdapterInvalid(f"file declares {declared} tensors, more than the limit of {limits.max_tensors}")
    _check_json_size(raw, limits)
    parsed = _parse_json(text)
    if not isinstance(parsed, dict):
        raise AdapterInvalid("safetensors header is not a JSON object")
    if _SURROGATE_ESCAPE.search(text) and _holds_lone_surrogate(parsed):
        raise AdapterInvalid(
            "safetensors header holds a lone UTF-16 surrogate escape (such as \\ud800), which is not "
            "text; the file is corrupt"
        )
    metadata = _check_metadata(parsed.pop(METADATA_KEY, None))
    if len(parsed) > limits.max_tensors:
        raise AdapterInvalid(
            f"file declares {len(parsed)} tensors, more than the limit of {limits.max_tensors}"
        )
    infos = [_check_entry(name, entry, limits) for name, entry in parsed.items()]
    data_bytes = file_size - 8 - header_len
    _check_layout(infos, data_bytes)
    infos.sort(key=lambda i: (i.begin, i.end))
    return SafetensorsHeader(
        tensors={i.name: i for i in infos},
        metadata=metadata,
        header_bytes=header_len,
        data_bytes=data_bytes,
    )


# A JSON string (possessive, so linear time), or a structural byte outside strings (group 1).
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+"|([{\[,])')
# What a header of ``max_tensors`` entries holds outside strings, at most: each entry is 3
# containers ({...}, shape [...], data_offsets [...]) and 7 commas (4 dims); the outer object,
# the metadata and a comma per metadata entry come out of the spare.
_STRUCTURE_PER_TENSOR = 10
_SPARE_STRUCTURE = 65_536


def _check_json_size(raw: bytes, limits: ParseLimits) -> None:
    """Refuse, before parsing, a header with more JSON values than ``max_tensors`` entries need.

    Parsing costs memory per value (a 16 MiB header of ``{},{},...`` would take over 400 MiB and
    seconds), so a header packed with small values is refused from a count of its structural
    bytes (``{``, ``[``, ``,``) instead: first in the raw bytes, an upper bound that every real
    file is within; only when that is over the limit, outside JSON strings, stopping as soon as
    the limit is passed (bounded time, no memory).
    """
    limit = _STRUCTURE_PER_TENSOR * limits.max_tensors + _SPARE_STRUCTURE
    if raw.count(b"{") + raw.count(b"[") + raw.count(b",") <= limit:
        return
    outside = (token for token in _JSON_TOKEN.finditer(raw) if token.lastindex)
    if next(itertools.islice(outside, limit, None), None) is not None:
        raise AdapterInvalid(
            f"safetensors header holds more than {limit} JSON objects, arrays and commas outside "
            f"strings, more than a header of at most {limits.max_tensors} tensors needs; the file "
            "is corrupt or hostile"
        )


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise AdapterInvalid(
                f"safetensors header repeats the key {_shown(key)}; readers disagree on which copy wins, "
                "so the file is refused"
            )
        seen[key] = value
    return seen


def _holds_lone_surrogate(value: object) -> bool:
    """True when a string anywhere in ``value`` (keys included) cannot be encoded as UTF-8.

    Iterative, so a deeply nested header costs no recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _no_constants(name: str) -> object:
    raise AdapterInvalid(f"safetensors header contains the non-JSON literal {name}")


def _parse_json(text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except AdapterInvalid:
        raise
    except RecursionError:
        raise AdapterInvalid("safetensors header nests JSON too deeply; the file is refused") from None
    except ValueError as exc:
        raise AdapterInvalid(f"safetensors header is not valid JSON: {exc}") from None


def _check_metadata(raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise AdapterInvalid("safetensors __metadata__ must be a JSON object of strings")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise AdapterInvalid(
                f"safetensors __metadata__ entry {_shown(key)} is a {type(value).__name__}, not a string"
            )
    return dict(raw)


def _check_entry(name: str, entry: object, limits: ParseLimits) -> TensorInfo:
    if not name or len(name) > limits.max_name_chars:
        raise AdapterInvalid(
            f"tensor name of {len(name)} characters is empty or longer than {limits.max_name_chars}"
        )
    shown = _shown(name)
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise AdapterInvalid(f"tensor {shown}: header entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise AdapterInvalid(f"tensor {shown}: shape must be a list of integers, got {_shown(shape)}")
    if len(shape) > limits.max_dims:
        raise AdapterInvalid(
            f"tensor {shown} has {len(shape)} dimensions; a LoRA tensor has at most {limits.max_dims}"
        )
    if any(d < 0 for d in shape):
        raise AdapterInvalid(f"tensor {shown} has a negative dimension in shape {_shown(shape)}")
    numel = math.prod(shape)  # Python ints: no overflow, however large the declared dims
    if numel > limits.max_tensor_elements:
        raise AdapterInvalid(
            f"tensor {shown} declares shape {_shown(shape)} ({_shown(numel)} elements), more than the "
            f"limit of {limits.max_tensor_elements}"
        )
    if not isinstance(dtype, str):  # a list or an object would not even be a dict key
        raise AdapterInvalid(f'tensor {shown}: dtype must be a string such as "F16", got {_shown(dtype)}')
    if dtype in SCALAR_INT_DTYPES:
        if numel > 1:
            raise AdapterInvalid(
                f"tensor {shown} has dtype {dtype}; integer tensors are accepted only as scalars (alpha)"
            )
    elif dtype not in FLOAT_DTYPES:
        raise AdapterInvalid(
            f"tensor {shown} has dtype {_shown(dtype)}; adapters must be F16, BF16 or F32 "
            "(re-save the adapter in one of these)"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise AdapterInvalid(f"tensor {shown}: data_offsets must be two integers, got {_shown(offsets)}")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise AdapterInvalid(f"tensor {shown}: data_offsets {_shown(offsets)} are not an increasing range")
    itemsize = _dtype_table(dtype)[1]
    if end - begin != numel * itemsize:
        raise AdapterInvalid(
            f"tensor {shown}: shape {_shown(shape)} of {dtype} needs {numel * itemsize} bytes but "
            f"data_offsets span {_shown(end - begin)}"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_layout(infos: list[TensorInfo], data_bytes: int) -> None:
    position = 0
    for info in sorted(infos, key=lambda i: (i.begin, i.end)):
        if info.begin != position:
            what = "overlaps the previous tensor" if info.begin < position else "leaves a gap before it"
            raise AdapterInvalid(
                f"tensor {_shown(info.name)} starts at data offset {_shown(info.begin)} but the previous "
                f"tensor ends at {position}: it {what}; the file is corrupt"
            )
        position = info.end
    if position > data_bytes:
        raise AdapterInvalid(
            f"tensors need {position} data bytes but the file holds only {data_bytes}; the file is truncated"
        )
    if position < data_bytes:
        raise AdapterInvalid(
            f"the file has {data_bytes - position} trailing byte(s) after the last tensor; "
            "it is corrupt or carries a hidden payload"
        )


DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in {**FLOAT_DTYPES, **SCALAR_INT_DTYPES}.items()}


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialize deterministically: tensors in name order, header keys sorted, header padded to
    8 bytes. Equal inputs give equal bytes (so equal sha256), unlike writers whose metadata
    order follows a hash map."""
    entries: dict[str, object] = {}
    if metadata:
        entries[METADATA_KEY] = {str(k): str(v) for k, v in sorted(metadata.items())}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        dtype = DTYPE_NAMES.get(tensor.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}; write F16, BF16 or F32")
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        span = [offset, offset + len(raw)]
        entries[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": span}
        chunks.append(raw)
        offset += len(raw)
    header = json.dumps(entries, separators=(",", ":"), sort_keys=False).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"".join(chunks)


def header_to_json(tensors: Mapping[str, TensorInfo]) -> list[dict[str, object]]:
    """A compact, JSON-friendly listing of a header (for logs and the CLI)."""
    return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in tensors.values()]
