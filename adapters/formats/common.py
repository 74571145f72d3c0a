"""Pieces every format reader shares: assembling modules of each kind, refusing the types loraloom
cannot apply.

Readers map each tensor name to ``(module key, role)``; the roles are LyCORIS' tensor
names (``LYCORIS_SUFFIXES``), which kohya-style files and the canonical layout share.
``make_module`` then checks one module's tensors and builds its canonical kind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from adapters.canonical import (
    DiffModule,
    DoraScale,
    LohaModule,
    LokrModule,
    LoraModule,
    Module,
    matrix_shape,
)
from adapters.errors import AdapterInvalid

# Tensor name suffixes of LyCORIS / kohya files (and of the canonical layout) -> role.
LYCORIS_SUFFIXES: dict[str, str] = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_mid.weight": "mid",
    ".alpha": "alpha",
    ".dora_scale": "dora_scale",
    ".hada_w1_a": "hada_w1_a",
    ".hada_w1_b": "hada_w1_b",
    ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1",
    ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1",
    ".lokr_w1_a": "lokr_w1_a",
    ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2",
    ".lokr_w2_a": "lokr_w2_a",
    ".lokr_w2_b": "lokr_w2_b",
    ".lokr_t2": "lokr_t2",
    ".diff": "diff",
    ".diff_b": "diff_b",
}

KIND_ROLES: dict[str, frozenset[str]] = {
    "LoRA": frozenset({"down", "up", "mid"}),
    "LoHa": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    "LoKr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "diff": frozenset({"diff", "diff_b"}),
}

# What to do with an adapter loraloom cannot apply: the merge step comes first, since a LoRA can
# only be extracted from a merged model.
CONVERT_ADVICE = (
    "To serve it, merge it into its base model with the tool that made it (e.g. LyCORIS' "
    "tools/merge.py, or A1111/ComfyUI's model merge/save), then extract a LoRA from that merged "
    "model against the same base (kohya's networks/extract_lora_from_models.py); or retrain it as "
    "LoRA, LoCon, LoHa or LoKr"
)

# Key fragments of adapter types loraloom does not apply, with the name a user knows them by.
# Checked before any format reader runs.
UNSUPPORTED_MARKERS: tuple[tuple[str, str], ...] = (
    (".oft_blocks", "OFT (orthogonal fine-tuning)"),
    (".oft_diag", "OFT (orthogonal fine-tuning)"),
    (".oft_r.", "OFT (orthogonal fine-tuning)"),
    (".boft_", "BOFT (butterfly orthogonal fine-tuning)"),
    (".a1.weight", "GLoRA (LyCORIS generalized LoRA)"),
    (".b1.weight", "GLoRA (LyCORIS generalized LoRA)"),
    (".lokr_t1", "LoKr with a Tucker first factor (lokr_t1), which LyCORIS never writes"),
    (".w_norm", "LyCORIS norm-layer tuning"),
    (".b_norm", "LyCORIS norm-layer tuning"),
    ("lora_magnitude_vector", "PEFT/diffusers DoRA (lora_magnitude_vector)"),
    (".ia3_", "(IA)^3"),
    (".on_input", "(IA)^3"),
    ("lora_embedding_a", "LoRA on embedding layers"),
    ("bundle_emb.", "a bundled textual-inversion embedding"),
    ("emb_params", "a textual-inversion embedding"),
)

# LyCORIS ``algo`` values (ss_network_args) whose files loraloom reads.
LYCORIS_ALGOS = {"lora", "locon", "lierla", "conv", "", "loha", "lokr", "full", "diff", "dylora"}
LYCORIS_UNSUPPORTED_ALGOS = {
    "ia3": "(IA)^3",
    "glora": "GLoRA (LyCORIS generalized LoRA)",
    "oft": "OFT (orthogonal fine-tuning)",
    "diag-oft": "OFT (orthogonal fine-tuning)",
    "boft": "BOFT (butterfly orthogonal fine-tuning)",
    "tlora": "T-LoRA",
}


def refuse_unsupported(keys: Iterable[str], metadata: Mapping[str, str]) -> None:
    """Raise ``AdapterInvalid`` naming the adapter type when loraloom cannot apply it."""
    for key in keys:
        lowered = key.lower()
        for marker, name in UNSUPPORTED_MARKERS:
            if marker in lowered:
                raise AdapterInvalid(
                    f"this adapter is {name} (tensor {key!r}), which loraloom does not apply "
                    f"(it serves LoRA, LoCon, LoHa, LoKr, DoRA and full diffs). {CONVERT_ADVICE}"
                )
    if "lycoris" in metadata.get("ss_network_module", ""):
        algo = str(network_args(metadata).get("algo", "")).lower()
        if algo not in LYCORIS_ALGOS:
            name = LYCORIS_UNSUPPORTED_ALGOS.get(algo, f"{algo!r}")
            raise AdapterInvalid(
                f"this adapter is a LyCORIS {algo!r} network ({name}; ss_network_args), which loraloom "
                f"does not apply. {CONVERT_ADVICE}"
            )


def network_args(metadata: Mapping[str, str]) -> dict:
    """kohya's ``ss_network_args`` (a JSON object of the trainer's ``--network_args``), or ``{}``."""
    try:
        args = json.loads(metadata.get("ss_network_args", "") or "{}")
    except ValueError:
        return {}
    return args if isinstance(args, dict) else {}


def _truthy(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    return None


@dataclass(frozen=True)
class ReadHints:
    """What the file's metadata says about tensors whose shape alone cannot: DoRA's axis.

    ``dora_on_output``: ``wd_on_output`` of ``ss_network_args`` when given (LyCORIS' DoRA
    normalizes per output row by default since 3.2); ``None`` when the file does not say.
    """

    dora_on_output: bool | None = None

    @classmethod
    def of(cls, metadata: Mapping[str, str]) -> ReadHints:
        return cls(dora_on_output=_truthy(network_args(metadata).get("wd_on_output")))


NO_HINTS = ReadHints()


@dataclass
class PendingModule:
    """Tensors collected for one module key while a reader walks the file (role -> tensor)."""

    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None

    @property
    def down(self) -> torch.Tensor | None:
        return self.parts.get("down")

    @property
    def up(self) -> torch.Tensor | None:
        return self.parts.get("up")


def scalar(tensor: torch.Tensor, name: str) -> float:
    if tensor.numel() != 1:
        raise AdapterInvalid(
            f"tensor {name!r} must be a single number (alpha), has shape {list(tensor.shape)}"
        )
    value = float(tensor.reshape(()).item())
    if not math.isfinite(value):
        raise AdapterInvalid(f"alpha {name!r} is not finite")
    return value


def _check_float(key: str, parts: Mapping[str, torch.Tensor]) -> None:
    for role, tensor in parts.items():
        if not tensor.is_floating_point():
            raise AdapterInvalid(f"module {key!r}: tensor {role} is {tensor.dtype}, not a float tensor")


def _dims(key: str, role: str, tensor: torch.Tensor, allowed: tuple[int, ...]) -> None:
    if tensor.dim() not in allowed:
        expected = " or ".join(str(d) for d in allowed)
        raise AdapterInvalid(
            f"module {key!r}: {role} has shape {list(tensor.shape)}; expected {expected} dims"
        )


def _nonzero(key: str, *tensors: torch.Tensor | None) -> None:
    if any(t is not None and t.numel() == 0 for t in tensors):
        raise AdapterInvalid(f"module {key!r} has rank 0 (empty factors); the adapter is broken")


def _agree(key: str, what: str, left: int, right: int) -> None:
    if left != right:
        raise AdapterInvalid(f"module {key!r}: {what} ({left} vs {right}); the factors do not fit together")


def make_module(key: str, pending: PendingModule, hints: ReadHints = NO_HINTS) -> Module:
    """Check one module's tensors and build its canonical kind (see ``adapters.canonical``)."""
    parts = dict(pending.parts)
    dora_scale = parts.pop("dora_scale", None)
    _check_float(key, parts)
    kinds = [kind for kind, roles in KIND_ROLES.items() if roles & parts.keys()]
    if len(kinds) > 1:
        raise AdapterInvalid(f"module {key!r} mixes {' and '.join(kinds)} tensors; one module is one kind")
    if not kinds:
        raise AdapterInvalid(
            f"module {key!r} has an alpha or a DoRA scale but no factors; the file is incomplete"
        )
    kind = kinds[0]
    if kind == "diff":
        if dora_scale is not None:
            raise AdapterInvalid(f"module {key!r}: a full diff has no DoRA scale")
        return _diff(key, parts)
    module = {"LoRA": _lora, "LoHa": _loha, "LoKr": _lokr}[kind](key, parts, pending.alpha)
    if dora_scale is None:
        return module
    if not dora_scale.is_floating_point():
        raise AdapterInvalid(f"module {key!r}: dora_scale is {dora_scale.dtype}, not a float tensor")
    return _with_dora(key, module, dora_scale, hints)


def _lora(key: str, parts: dict[str, torch.Tensor], alpha: float | None) -> LoraModule:
    down, up, mid = parts.get("down"), parts.get("up"), parts.get("mid")
    if down is None or up is None:
        have, missing = ("up", "down") if down is None else ("down", "up")
        raise AdapterInvalid(
            f"module {key!r} has a {have} factor but no {missing} factor; the file is incomplete"
        )
    for role, tensor in (("down factor", down), ("up factor", up)):
        if tensor.dim() not in (2, 4):
            raise AdapterInvalid(
                f"module {key!r}: the {role.split()[0]} factor has shape {list(tensor.shape)}; "
                "expected 2 dims (linear) or 4 dims (conv)"
            )
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise AdapterInvalid(f"module {key!r}: conv up factor must be (out, rank, 1, 1), is {list(up.shape)}")
    if up.dim() == 4 and down.dim() == 2:
        raise AdapterInvalid(f"module {key!r}: conv up factor with a linear down factor")
    _nonzero(key, down, up)
    if mid is not None:
        down = _fold_tucker(key, down, mid)
    if down.dim() == 4 and up.dim() == 2:
        up = up.reshape(*up.shape, 1, 1)
    rank = int(down.shape[0])
    if int(up.shape[1]) != rank:
        raise AdapterInvalid(
            f"module {key!r}: down factor has rank {rank} but up factor has rank {int(up.shape[1])}"
        )
    return LoraModule(
        down=down.contiguous(), up=up.contiguous(), alpha=float(rank) if alpha is None else alpha
    )


def _fold_tucker(key: str, down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """LoCon's Tucker core folded into the down factor: ``down' = mid x down`` (r, in, kh, kw).

    ``up @ down'`` is exactly LyCORIS' ``rebuild_tucker(mid, up, down)``; computed in float32.
    """
    _dims(key, "lora_mid", mid, (4,))
    if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1):
        raise AdapterInvalid(
            f"module {key!r}: with lora_mid the down factor must be 1x1, is {list(down.shape)}"
        )
    _nonzero(key, mid)
    _agree(
        key, "lora_mid's input rank and the down factor's rank differ", int(mid.shape[1]), int(down.shape[0])
    )
    flat = down.reshape(down.shape[0], -1).to(torch.float32)
    return torch.einsum("i j k l, j n -> i n k l", mid.to(torch.float32), flat)


def _loha(key: str, parts: dict[str, torch.Tensor], alpha: float | None) -> LohaModule:
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    missing = [name for name in names if name not in parts]
    if missing:
        raise AdapterInvalid(f"module {key!r} is LoHa but lacks {', '.join(missing)}; the file is incomplete")
    w1_a, w1_b, w2_a, w2_b = (parts[name] for name in names)
    t1, t2 = parts.get("hada_t1"), parts.get("hada_t2")
    if (t1 is None) != (t2 is None):
        raise AdapterInvalid(f"module {key!r}: a Tucker LoHa needs both hada_t1 and hada_t2")
    for name in names:
        _dims(key, name, parts[name], (2,))
    _nonzero(key, w1_a, w1_b, w2_a, w2_b, t1, t2)
    if t1 is None:
        _agree(key, "hada_w1_a and hada_w1_b ranks differ", int(w1_a.shape[1]), int(w1_b.shape[0]))
        _agree(key, "hada_w2_a and hada_w2_b ranks differ", int(w2_a.shape[1]), int(w2_b.shape[0]))
        first = (int(w1_a.shape[0]), int(w1_b.shape[1]))
        second = (int(w2_a.shape[0]), int(w2_b.shape[1]))
    else:
        for name, core, a, b in (("hada_t1", t1, w1_a, w1_b), ("hada_t2", t2, w2_a, w2_b)):
            _dims(key, name, core, (3, 4, 5))
            _agree(key, f"{name}'s ranks and its factors' ranks differ", int(core.shape[0]), int(a.shape[0]))
            _agree(key, f"{name}'s ranks and its factors' ranks differ", int(core.shape[1]), int(b.shape[0]))
        first = (int(w1_a.shape[1]), int(w1_b.shape[1]), *t1.shape[2:])
        second = (int(w2_a.shape[1]), int(w2_b.shape[1]), *t2.shape[2:])
    if tuple(first) != tuple(second):
        raise AdapterInvalid(
            f"module {key!r}: the two LoHa factors build weights of shapes {list(first)} and {list(second)}"
        )
    rank = int(w1_b.shape[0])
    return LohaModule(
        w1_a=w1_a.contiguous(),
        w1_b=w1_b.contiguous(),
        w2_a=w2_a.contiguous(),
        w2_b=w2_b.contiguous(),
        alpha=float(rank) if alpha is None else alpha,
        t1=None if t1 is None else t1.contiguous(),
        t2=None if t2 is None else t2.contiguous(),
    )


def _lokr(key: str, parts: dict[str, torch.Tensor], alpha: float | None) -> LokrModule:
    w1, w1_a, w1_b = parts.get("lokr_w1"), parts.get("lokr_w1_a"), parts.get("lokr_w1_b")
    w2, w2_a, w2_b, t2 = (
        parts.get("lokr_w2"),
        parts.get("lokr_w2_a"),
        parts.get("lokr_w2_b"),
        parts.get("lokr_t2"),
    )
    if not _one_of(w1, w1_a, w1_b):
        raise AdapterInvalid(
            f"module {key!r} is LoKr but needs either lokr_w1 or both lokr_w1_a and lokr_w1_b"
        )
    if not _one_of(w2, w2_a, w2_b):
        raise AdapterInvalid(
            f"module {key!r} is LoKr but needs either lokr_w2 or both lokr_w2_a and lokr_w2_b"
        )
    if t2 is not None and w2 is not None:
        raise AdapterInvalid(f"module {key!r}: lokr_t2 belongs with lokr_w2_a/lokr_w2_b, not lokr_w2")
    _nonzero(key, w1, w1_a, w1_b, w2, w2_a, w2_b, t2)
    if w1 is not None:
        _dims(key, "lokr_w1", w1, (2,))
    else:
        _dims(key, "lokr_w1_a", w1_a, (2,))
        _dims(key, "lokr_w1_b", w1_b, (2,))
        _agree(key, "lokr_w1_a and lokr_w1_b ranks differ", int(w1_a.shape[1]), int(w1_b.shape[0]))
    if w2 is not None:
        _dims(key, "lokr_w2", w2, (2, 3, 4, 5))
    elif t2 is not None:
        _dims(key, "lokr_t2", t2, (3, 4, 5))
        _dims(key, "lokr_w2_a", w2_a, (2,))
        _dims(key, "lokr_w2_b", w2_b, (2,))
        _agree(key, "lokr_t2's ranks and lokr_w2_a's rank differ", int(t2.shape[0]), int(w2_a.shape[0]))
        _agree(key, "lokr_t2's ranks and lokr_w2_b's rank differ", int(t2.shape[1]), int(w2_b.shape[0]))
    else:
        _dims(key, "lokr_w2_a", w2_a, (2,))
        _dims(key, "lokr_w2_b", w2_b, (2, 3, 4, 5))
        _agree(key, "lokr_w2_a and lokr_w2_b ranks differ", int(w2_a.shape[1]), int(w2_b.shape[0]))
    if w1_b is not None and w2_b is not None and t2 is None:
        _agree(key, "the two low-rank factors' ranks differ", int(w1_b.shape[0]), int(w2_b.shape[0]))
    module = LokrModule(
        alpha=0.0,
        w1=_contiguous(w1),
        w1_a=_contiguous(w1_a),
        w1_b=_contiguous(w1_b),
        w2=_contiguous(w2),
        w2_a=_contiguous(w2_a),
        w2_b=_contiguous(w2_b),
        t2=_contiguous(t2),
    )
    rank = module.factor_rank
    default = float(rank) if rank is not None else 1.0
    return LokrModule(**{**_fields(module), "alpha": default if alpha is None else alpha})


def _one_of(full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """A LoKr factor is a full matrix or a low-rank pair, never both, never half a pair."""
    if full is not None:
        return a is None and b is None
    return a is not None and b is not None


def _contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.contiguous()


def _fields(module) -> dict:
    from dataclasses import fields

    return {f.name: getattr(module, f.name) for f in fields(module)}


def _diff(key: str, parts: dict[str, torch.Tensor]) -> DiffModule:
    diff, bias = parts.get("diff"), parts.get("diff_b")
    if diff is None:
        raise AdapterInvalid(f"module {key!r} has a bias difference (diff_b) but no weight difference (diff)")
    _dims(key, "diff", diff, (2, 3, 4, 5))
    _nonzero(key, diff)
    if bias is not None and tuple(bias.shape) != (int(diff.shape[0]),):
        raise AdapterInvalid(
            f"module {key!r}: diff_b has shape {list(bias.shape)}, expected [{int(diff.shape[0])}] "
            "(one value per output)"
        )
    return DiffModule(diff=diff.contiguous(), bias=_contiguous(bias))


def _with_dora(key: str, module: Module, scale: torch.Tensor, hints: ReadHints) -> Module:
    """The module with its DoRA magnitude, the axis told by the tensor's shape (``(out, 1, ...)``:
    per output row; ``(1, in, ...)``: per input channel), else by ``wd_on_output`` in the
    file's ``ss_network_args``, else per input channel (A1111's and ComfyUI's rule)."""
    from dataclasses import replace

    shape = module.weight_shape
    out, n = matrix_shape(shape)
    channels = int(shape[1]) if module.exact_shape or len(shape) > 2 else None
    dims = tuple(int(d) for d in scale.shape)
    axis: str | None = None
    if len(dims) >= 2 and all(d == 1 for d in dims[1:]) and dims[0] == out:
        axis = "out"
    elif len(dims) >= 2 and dims[0] == 1 and all(d == 1 for d in dims[2:]):
        if channels is None and dims[1] and n % dims[1] == 0:
            channels = dims[1]  # a flattened conv: the scale names the input channels
        if dims[1] == channels:
            axis = "in"
    elif len(dims) <= 1:
        size = scale.numel()
        fits = [name for name, length in (("out", out), ("in", channels)) if length == size]
        if len(fits) == 2 and hints.dora_on_output is not None:
            axis = "out" if hints.dora_on_output else "in"
        elif fits:
            axis = fits[-1] if len(fits) == 2 else fits[0]
    if axis is None:
        raise AdapterInvalid(
            f"module {key!r}: dora_scale has shape {list(dims)}, which is neither one value per output "
            f"row ({out}) nor one per input channel of the weight {list(shape)}"
        )
    return replace(module, dora=DoraScale(magnitude=scale.reshape(-1).contiguous(), axis=axis))


def build_modules(pending: Mapping[str, PendingModule], hints: ReadHints = NO_HINTS) -> dict[str, Module]:
    modules = {key: make_module(key, item, hints) for key, item in pending.items()}
    if not modules:
        raise AdapterInvalid("the file holds no LoRA modules")
    return modules


def refuse_unknown_keys(keys: Iterable[str], fmt: str) -> None:
    keys = list(keys)
    if keys:
        shown = ", ".join(repr(k) for k in keys[:5])
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        raise AdapterInvalid(
            f"{len(keys)} tensor(s) of this {fmt} file are not adapter factors or alphas: {shown}{more}; "
            "loraloom refuses files it cannot apply in full"
        )


def collect(tensors: Mapping[str, torch.Tensor], parse, fmt: str) -> dict[str, PendingModule]:
    """Group tensors into modules. ``parse(key)`` returns ``(module key, role)`` (a role of
    ``LYCORIS_SUFFIXES``), or ``None`` for a key that is not part of an adapter."""
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
        elif role in item.parts:
            shown = {"down": "down factor", "up": "up factor"}.get(role, role)
            raise AdapterInvalid(f"two tensors give the {shown} of module {module_key!r} (second: {name!r})")
        else:
            item.parts[role] = tensor
    refuse_unknown_keys(unknown, fmt)
    return pending


def split_suffix(key: str, suffixes: Mapping[str, str] = LYCORIS_SUFFIXES) -> tuple[str, str] | None:
    """``(stem, role)`` for a name ending in one of ``suffixes`` (the longest that matches)."""
    best = None
    for suffix, role in suffixes.items():
        if key.endswith(suffix) and (best is None or len(suffix) > len(best[0])):
            best = (suffix, role)
    return None if best is None else (key[: -len(best[0])], best[1])


def match_pattern(patterns: Mapping[str, object] | None, path: str) -> object | None:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup, literal (no regex from untrusted files):
    a pattern matches a module path equal to it or ending in ``.<pattern>``; first match wins."""
    for pattern, value in (patterns or {}).items():
        if path == pattern or path.endswith("." + pattern):
            return value
    return None


def module_tensors(stem: str, module: Module) -> dict[str, torch.Tensor]:
    """One module's tensors under ``stem`` with LyCORIS' names (what kohya-style readers and the
    canonical layout read back): a LoRA as ``lora_down``/``lora_up``/``alpha`` exactly as before."""
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(module, LoraModule):
        tensors[f"{stem}.lora_down.weight"] = module.down.contiguous()
        tensors[f"{stem}.lora_up.weight"] = module.up.contiguous()
    elif isinstance(module, LohaModule):
        for name in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"):
            value = getattr(module, name)
            if value is not None:
                tensors[f"{stem}.hada_{name}"] = value.contiguous()
    elif isinstance(module, LokrModule):
        for name in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2"):
            value = getattr(module, name)
            if value is not None:
                tensors[f"{stem}.lokr_{name}"] = value.contiguous()
    else:
        tensors[f"{stem}.diff"] = module.diff.contiguous()
        if module.bias is not None:
            tensors[f"{stem}.diff_b"] = module.bias.contiguous()
        return tensors
    tensors[f"{stem}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
    if module.dora is not None:
        tensors[f"{stem}.dora_scale"] = module.dora.shaped(module.weight_shape).contiguous()
    return tensors
