"""Pieces every format reader shares: assembling modules, refusing non-LoRA types."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from adapters.canonical import LoraModule
from adapters.errors import AdapterInvalid

# Key fragments of adapter types that are not plain LoRA / LoCon, with the name
# a user knows them by. Checked before any format reader runs.
UNSUPPORTED_MARKERS: tuple[tuple[str, str], ...] = (
    (".hada_w1_a", "LoHa (LyCORIS Hadamard product)"),
    (".hada_w2_a", "LoHa (LyCORIS Hadamard product)"),
    (".hada_t1", "LoHa (LyCORIS Hadamard product)"),
    (".lokr_w1", "LoKr (LyCORIS Kronecker product)"),
    (".lokr_w2", "LoKr (LyCORIS Kronecker product)"),
    (".lokr_t2", "LoKr (LyCORIS Kronecker product)"),
    (".oft_blocks", "OFT (orthogonal fine-tuning)"),
    (".oft_diag", "OFT (orthogonal fine-tuning)"),
    (".oft_r.", "OFT (orthogonal fine-tuning)"),
    (".boft_", "BOFT (butterfly orthogonal fine-tuning)"),
    (".a1.weight", "GLoRA (LyCORIS generalized LoRA)"),
    (".b1.weight", "GLoRA (LyCORIS generalized LoRA)"),
    (".diff", "LyCORIS full weight difference ('full'/'diff')"),
    (".w_norm", "LyCORIS norm-layer tuning"),
    (".b_norm", "LyCORIS norm-layer tuning"),
    (".lora_mid.", "LoCon with Tucker/CP decomposition (lora_mid)"),
    (".dora_scale", "DoRA (weight-decomposed LoRA)"),
    ("lora_magnitude_vector", "DoRA (weight-decomposed LoRA)"),
    (".ia3_", "(IA)^3"),
    (".on_input", "(IA)^3"),
    ("lora_embedding_a", "LoRA on embedding layers"),
    ("bundle_emb.", "a bundled textual-inversion embedding"),
    ("emb_params", "a textual-inversion embedding"),
)

LYCORIS_LORA_ALGOS = {"lora", "locon", "lierla", "conv", ""}


def refuse_unsupported(keys: Iterable[str], metadata: Mapping[str, str]) -> None:
    """Raise ``AdapterInvalid`` naming the adapter type when it is not plain LoRA / LoCon."""
    for key in keys:
        lowered = key.lower()
        for marker, name in UNSUPPORTED_MARKERS:
            if marker in lowered:
                raise AdapterInvalid(
                    f"this adapter is {name} (tensor {key!r}); loraloom serves plain LoRA and LoCon only. "
                    "Convert it to LoRA (e.g. extract a LoRA from the merged model with kohya's "
                    "networks/extract_lora_from_models.py) or retrain it as LoRA"
                )
    if "lycoris" in metadata.get("ss_network_module", ""):
        try:
            args = json.loads(metadata.get("ss_network_args", "{}"))
        except ValueError:
            args = {}
        algo = str(args.get("algo", "")).lower() if isinstance(args, dict) else ""
        if algo not in LYCORIS_LORA_ALGOS:
            raise AdapterInvalid(
                f"this adapter is a LyCORIS {algo!r} network (ss_network_args); loraloom serves plain LoRA "
                "and LoCon only"
            )


@dataclass
class PendingModule:
    """Factors collected for one module key while a reader walks the tensors."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


def scalar(tensor: torch.Tensor, name: str) -> float:
    if tensor.numel() != 1:
        raise AdapterInvalid(
            f"tensor {name!r} must be a single number (alpha), has shape {list(tensor.shape)}"
        )
    value = float(tensor.reshape(()).item())
    if not math.isfinite(value):
        raise AdapterInvalid(f"alpha {name!r} is not finite")
    return value


def make_module(key: str, pending: PendingModule) -> LoraModule:
    """Check one module's factors and build the canonical ``LoraModule``."""
    where = key
    if pending.down is None or pending.up is None:
        have, missing = ("up", "down") if pending.down is None else ("down", "up")
        raise AdapterInvalid(
            f"module {where!r} has a {have} factor but no {missing} factor; the file is incomplete"
        )
    down, up = pending.down, pending.up
    for name, tensor in (("down", down), ("up", up)):
        if not tensor.is_floating_point():
            raise AdapterInvalid(f"module {where!r}: the {name} factor is {tensor.dtype}, not a float tensor")
        if tensor.dim() not in (2, 4):
            raise AdapterInvalid(
                f"module {where!r}: the {name} factor has shape {list(tensor.shape)}; "
                "expected 2 dims (linear) or 4 dims (conv)"
            )
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise AdapterInvalid(
            f"module {where!r}: conv up factor must be (out, rank, 1, 1), is {list(up.shape)}"
        )
    if up.dim() == 4 and down.dim() == 2:
        raise AdapterInvalid(f"module {where!r}: conv up factor with a linear down factor")
    if down.dim() == 4 and up.dim() == 2:
        up = up.reshape(*up.shape, 1, 1)
    rank = int(down.shape[0])
    if rank == 0 or up.shape[1] == 0:
        raise AdapterInvalid(f"module {where!r} has rank 0 (empty factors); the adapter is broken")
    if int(up.shape[1]) != rank:
        raise AdapterInvalid(
            f"module {where!r}: down factor has rank {rank} but up factor has rank {int(up.shape[1])}"
        )
    alpha = float(rank) if pending.alpha is None else pending.alpha
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=alpha)


def build_modules(pending: Mapping[str, PendingModule]) -> dict[str, LoraModule]:
    modules = {key: make_module(key, item) for key, item in pending.items()}
    if not modules:
        raise AdapterInvalid("the file holds no LoRA modules")
    return modules


def refuse_unknown_keys(keys: Iterable[str], fmt: str) -> None:
    keys = list(keys)
    if keys:
        shown = ", ".join(repr(k) for k in keys[:5])
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        raise AdapterInvalid(
            f"{len(keys)} tensor(s) of this {fmt} file are not LoRA factors or alphas: {shown}{more}; "
            "loraloom refuses files it cannot apply in full"
        )


def collect(tensors: Mapping[str, torch.Tensor], parse, fmt: str) -> dict[str, PendingModule]:
    """Group tensors into modules. ``parse(key)`` returns ``(module key, role)`` with role
    ``down``/``up``/``alpha``, or ``None`` for a key that is not part of a LoRA."""
    pending: dict[str, PendingModule] = {}
    unknown: list[str] = []
    for name, tensor in tensors.items():
        parsed = parse(name)
        if parsed is None:
            unknown.append(name)
            continue
        module_key, role = parsed
        item = pending.setdefault(module_key, PendingModule())
        if role == "alpha":
            item.alpha = scalar(tensor, name)
        elif getattr(item, role) is not None:
            raise AdapterInvalid(
                f"two tensors give the {role} factor of module {module_key!r} (second: {name!r})"
            )
        else:
            setattr(item, role, tensor)
    refuse_unknown_keys(unknown, fmt)
    return pending


def match_pattern(patterns: Mapping[str, object] | None, path: str) -> object | None:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup, literal (no regex from untrusted files):
    a pattern matches a module path equal to it or ending in ``.<pattern>``; first match wins."""
    for pattern, value in (patterns or {}).items():
        if path == pattern or path.endswith("." + pattern):
            return value
    return None
