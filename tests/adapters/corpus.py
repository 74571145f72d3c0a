"""A corpus of malicious and broken adapter files, and small valid adapters to build them from.

``build_corpus(folder, shapes)`` writes every case into ``folder`` and returns
them with the error each must raise (type and a message fragment). The store's
tests reuse it (``from tests.adapters.corpus import build_corpus``) to show that
no refused file leaves a row or a blob.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from adapters.canonical import BaseModelRef, LoraAdapter, LoraModule
from adapters.errors import AdapterIncompatible, AdapterInvalid, LoraloomError
from adapters.formats import save_canonical, to_kohya

# A few micro-model modules: linear attention, a 1x1 conv and a 3x3 conv (LoCon).
DEFAULT_KEYS = (
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.1.attentions.0.proj_in",
    "unet.down_blocks.0.resnets.0.conv1",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
)


@dataclass(frozen=True)
class CorpusCase:
    """One bad file: where it is, what must be raised, and whether refusing it needs the base model."""

    name: str
    path: Path
    error: type[LoraloomError]
    match: str
    needs_base: bool = False


def make_adapter(
    shapes: Mapping[str, tuple[int, ...]],
    keys: tuple[str, ...] = DEFAULT_KEYS,
    rank: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    alpha: float | None = None,
) -> LoraAdapter:
    """A valid adapter with random factors for ``keys`` of a base described by ``shapes``."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for key in keys:
        shape = tuple(shapes[key])
        down = torch.randn((rank, *shape[1:]), generator=generator).to(dtype)
        up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        up = torch.randn(up_shape, generator=generator).to(dtype)
        modules[key] = LoraModule(down=down, up=up, alpha=float(alpha if alpha is not None else rank / 2))
    return LoraAdapter(modules=modules, metadata={"ss_output_name": f"corpus-{seed}"})


def raw_safetensors(header: Mapping | str | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    """Hand-built safetensors bytes: any header (even invalid JSON) and any length field."""
    if isinstance(header, Mapping):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    length = len(header) if header_len is None else header_len
    return struct.pack("<Q", length) + header + data


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _factor_file(keys_suffixes: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save({k: v.contiguous() for k, v in keys_suffixes.items()}, metadata=metadata)


def build_corpus(folder: Path, shapes: Mapping[str, tuple[int, ...]]) -> list[CorpusCase]:
    """Write every bad file into ``folder``; ``shapes`` is the micro model's ``module_shapes``."""
    folder.mkdir(parents=True, exist_ok=True)
    cases: list[CorpusCase] = []
    good = make_adapter(shapes)
    q = DEFAULT_KEYS[0]

    def add(name: str, content: bytes, match: str, error=AdapterInvalid, suffix=".safetensors", base=False):
        path = folder / f"{name}{suffix}"
        path.write_bytes(content)
        cases.append(CorpusCase(name, path, error, match, base))

    eight = bytes(8)
    # The pre-check, case by case.
    add("empty_file", b"", "shorter than the 8-byte header length")
    add("header_length_huge", struct.pack("<Q", 1 << 40) + b"{}", "more than the 16777216-byte limit")
    add("header_truncated", struct.pack("<Q", 4096) + b'{"a": 1}', "the file is truncated")
    add("header_not_json", raw_safetensors('{"w": {"dtype": "F32", '), "not valid JSON")
    add("header_not_object", raw_safetensors("[1, 2, 3]"), "does not start with '{'")
    add(
        "header_duplicate_key",
        raw_safetensors(
            '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "w": '
            '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
            eight,
        ),
        "repeats the key 'w'",
    )
    add(
        "header_nan_literal",
        raw_safetensors('{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', bytes(4)),
        "non-JSON literal NaN",
    )
    add(
        "header_deep_nesting",
        raw_safetensors('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}"),
        "nests JSON too deeply",
    )
    add("metadata_not_string", raw_safetensors({"__metadata__": {"a": 1}}), "__metadata__ entry 'a' is a int")
    add(
        "entry_extra_field",
        raw_safetensors({"w": {**_entry("F32", [2], 0, 8), "hook": "x"}}, eight),
        "exactly dtype, shape and data_offsets",
    )
    add(
        "offsets_overlap",
        raw_safetensors({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, bytes(12)),
        "overlaps the previous tensor",
    )
    add(
        "offsets_gap",
        raw_safetensors({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 12, 20)}, bytes(20)),
        "leaves a gap before it",
    )
    add(
        "offsets_outside_file",
        raw_safetensors({"a": _entry("F32", [1024], 0, 4096)}, eight),
        "but the file holds only 8",
    )
    add(
        "trailing_bytes",
        raw_safetensors({"a": _entry("F32", [2], 0, 8)}, bytes(8 + 100)),
        "100 trailing byte",
    )
    add("dtype_f64", raw_safetensors({"a": _entry("F64", [1], 0, 8)}, eight), "dtype 'F64'")
    add("dtype_object", raw_safetensors({"a": _entry("O", [1], 0, 8)}, eight), "dtype 'O'")
    add(
        "dtype_int_tensor",
        raw_safetensors({"a": _entry("I64", [4], 0, 32)}, bytes(32)),
        "integer tensors are accepted only as scalars",
    )
    add(
        "huge_declared_shape",
        raw_safetensors({"a": _entry("F32", [1 << 62, 1 << 62, 1 << 62], 0, 4)}, bytes(4)),
        "more than the limit of 2147483648",
    )
    add(
        "shape_offsets_mismatch",
        raw_safetensors({"a": _entry("F32", [4, 4], 0, 8)}, eight),
        "needs 64 bytes but data_offsets span 8",
    )
    add(
        "too_many_dims",
        raw_safetensors({"a": _entry("F32", [1, 1, 1, 1, 1], 0, 4)}, bytes(4)),
        "has 5 dimensions",
    )
    add(
        "negative_dim",
        raw_safetensors({"a": _entry("F32", [-1, -4], 0, 16)}, bytes(16)),
        "negative dimension",
    )
    many = {f"t{i}": _entry("F32", [0], 0, 0) for i in range(65_537)}
    add("too_many_tensors", raw_safetensors(many), "declares 65537 tensors, more than the limit of 65536")

    # Pickles, never loaded.
    zipped = folder / "pickle_zip.safetensors"
    torch.save({"w": torch.ones(2)}, zipped)
    cases.append(CorpusCase("pickle_zip", zipped, AdapterInvalid, "zip archive .* never unpickles"))
    legacy = folder / "pickle_legacy.safetensors"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    cases.append(CorpusCase("pickle_legacy", legacy, AdapterInvalid, r"Python pickle \(protocol 2"))
    add("checkpoint_suffix", save_canonical(good), "only .safetensors adapters are accepted", suffix=".ckpt")

    # Values.
    nan = good.modules[q]
    add(
        "nan_weights",
        _factor_file(
            {
                f"{q}.lora_down.weight": nan.down.clone().fill_(float("nan")),
                f"{q}.lora_up.weight": nan.up,
                f"{q}.alpha": torch.tensor(2.0),
            },
            {"loraloom.format": "canonical/1"},
        ),
        "non-finite value",
    )
    add(
        "inf_weights",
        _factor_file(
            {
                f"{q}.lora_down.weight": nan.down,
                f"{q}.lora_up.weight": nan.up * float("inf"),
                f"{q}.alpha": torch.tensor(2.0),
            }
        ),
        "non-finite value",
    )

    # LyCORIS kinds, broken; and adapter types loraloom does not apply.
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    add(
        "loha",
        _factor_file(
            {
                f"{stem}.hada_w1_a": torch.ones(64, 4),
                f"{stem}.hada_w1_b": torch.ones(4, 64),
                f"{stem}.hada_w2_a": torch.ones(32, 4),
                f"{stem}.hada_w2_b": torch.ones(4, 64),
                f"{stem}.alpha": torch.tensor(4.0),
            }
        ),
        r"the two LoHa factors build weights of shapes \[64, 64\] and \[32, 64\]",
    )
    add(
        "lokr",
        _factor_file(
            {
                f"{stem}.lokr_w1_a": torch.ones(8, 2),
                f"{stem}.lokr_w2": torch.ones(8, 8),
                f"{stem}.alpha": torch.tensor(4.0),
            }
        ),
        "needs either lokr_w1 or both lokr_w1_a and lokr_w1_b",
    )
    add(
        "dora",
        _factor_file(
            {
                f"{stem}.lora_down.weight": torch.ones(4, 64),
                f"{stem}.lora_up.weight": torch.ones(64, 4),
                f"{stem}.dora_scale": torch.ones(1, 63),
            }
        ),
        r"dora_scale has shape \[1, 63\], which is neither one value per output row",
    )
    add(
        "mixed_kinds",
        _factor_file(
            {
                f"{stem}.lora_down.weight": torch.ones(4, 64),
                f"{stem}.lora_up.weight": torch.ones(64, 4),
                f"{stem}.lokr_w1": torch.ones(8, 8),
                f"{stem}.lokr_w2": torch.ones(8, 8),
            }
        ),
        "mixes LoRA and LoKr tensors",
    )
    add(
        "bias_diff_alone",
        _factor_file({f"{stem}.diff_b": torch.ones(64)}),
        r"has a bias difference \(diff_b\) but no weight difference",
    )
    add(
        "oft",
        _factor_file({f"{stem}.oft_blocks": torch.ones(4, 16, 16), f"{stem}.alpha": torch.tensor(1.0)}),
        r"OFT \(orthogonal fine-tuning\).*merge it into its base model",
    )
    add(
        "glora",
        _factor_file(
            {
                f"{stem}.a1.weight": torch.ones(4, 64),
                f"{stem}.a2.weight": torch.ones(64, 4),
                f"{stem}.b1.weight": torch.ones(4, 64),
                f"{stem}.b2.weight": torch.ones(64, 4),
            }
        ),
        r"GLoRA \(LyCORIS generalized LoRA\)",
    )
    add(
        "lycoris_algo_metadata",
        _factor_file(
            {f"{stem}.lora_down.weight": torch.ones(4, 64), f"{stem}.lora_up.weight": torch.ones(64, 4)},
            {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "ia3"}'},
        ),
        r"LyCORIS 'ia3' network \(\(IA\)\^3",
    )

    # Structurally broken LoRAs.
    add(
        "rank_zero",
        _factor_file(
            {
                f"{q}.lora_down.weight": torch.ones(0, 64),
                f"{q}.lora_up.weight": torch.ones(64, 0),
                f"{q}.alpha": torch.tensor(1.0),
            }
        ),
        "has rank 0",
    )
    add(
        "rank_mismatch",
        _factor_file({f"{q}.lora_down.weight": torch.ones(4, 64), f"{q}.lora_up.weight": torch.ones(64, 2)}),
        "down factor has rank 4 but up factor has rank 2",
    )
    add("missing_up", _factor_file({f"{q}.lora_down.weight": torch.ones(4, 64)}), "no up factor")
    add(
        "kohya_stray_tensor",
        _factor_file(
            {
                f"{stem}.lora_down.weight": torch.ones(4, 64),
                f"{stem}.lora_up.weight": torch.ones(64, 4),
                f"{stem}.hypernet_bias": torch.ones(64),
            }
        ),
        "are not adapter factors or alphas",
    )
    add(
        "peft_without_config",
        _factor_file(
            {
                "base_model.model.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.ones(4, 64),
                "base_model.model.down_blocks.1.attentions.0.proj_in.lora_B.weight": torch.ones(64, 4),
            }
        ),
        "adapter_config.json",
    )
    add(
        "not_a_lora",
        _factor_file({"conv_in.weight": torch.ones(4, 4), "conv_in.bias": torch.ones(4)}),
        "no LoRA format recognised",
    )
    add("no_tensors", raw_safetensors({"__metadata__": {"a": "b"}}), "no LoRA format recognised")

    # Well-formed, but not for this base model.
    other_arch = LoraAdapter(modules=good.modules, base=BaseModelRef("sdxl", "0" * 64))
    add(
        "wrong_architecture",
        save_canonical(other_arch),
        "made for a sdxl base model",
        AdapterIncompatible,
        base=True,
    )
    wide = {**shapes, q: (128, 64)}
    add(
        "wrong_shapes",
        save_canonical(make_adapter(wide, keys=(q,))),
        r"1 shape mismatch\(es\): .*adapter updates \[128, 64\], base weight is \[64, 64\]",
        AdapterIncompatible,
        base=True,
    )
    foreign = {f"unet.down_blocks.{i}.attentions.0.proj_in": (64, 64, 1, 1) for i in range(7, 14)}
    add(
        "unknown_modules",
        to_kohya(make_adapter(foreign, keys=tuple(foreign))),
        r"7 module\(s\) not in the base model: .*; and 2 more",
        AdapterIncompatible,
        base=True,
    )
    return cases
