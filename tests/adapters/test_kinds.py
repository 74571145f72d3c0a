"""The adapter kinds one by one: each layout's update against lycoris-lora's own ``functional`` math,
DoRA's two axes, what "rank" means per kind, round trips through every writer, per-part weights."""

from __future__ import annotations

import json

import pytest
import torch
from lycoris.functional import general, locon, loha, lokr

from adapters.blend import (
    Blend,
    PartWeights,
    PreparedModule,
    add_update,
    combine,
    prepare_module,
)
from adapters.canonical import DiffModule, DoraScale, LohaModule, LokrModule, LoraAdapter, LoraModule
from adapters.errors import AdapterInvalid, InvalidArgument
from adapters.formats import load_adapter, parse_adapter, save_canonical, to_diffusers, to_kohya
from adapters.validation import validate_against_base

Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # (64, 64) in micro
CONV = "unet.down_blocks.0.resnets.0.conv1"  # (32, 32, 3, 3) in micro


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _close(got, expected, tol=1e-5):
    scale = float(expected.abs().max()) or 1.0
    assert float((got - expected).abs().max()) / scale < tol


# ----------------------------------------------------------------- each kind against LyCORIS' functional math


def test_loha_matches_lycoris_functional_with_and_without_tucker():
    w1a, w1b, w2a, w2b = (
        _randn(32, 4, seed=1),
        _randn(4, 288, seed=2),
        _randn(32, 4, seed=3),
        _randn(4, 288, seed=4),
    )
    flat = LohaModule(w1_a=w1a, w1_b=w1b, w2_a=w2a, w2_b=w2b, alpha=2.0)
    assert flat.scale == 0.5 and flat.weight_shape == (32, 288) and not flat.exact_shape
    _close(flat.delta(), loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=0.5).reshape(32, 288))
    assert flat.fits((32, 32, 3, 3)) and not flat.fits((32, 16, 3, 3))
    t1, t2 = _randn(4, 4, 3, 3, seed=5), _randn(4, 4, 3, 3, seed=6)
    a1, b1, a2, b2 = (
        _randn(4, 32, seed=7),
        _randn(4, 32, seed=8),
        _randn(4, 32, seed=9),
        _randn(4, 32, seed=10),
    )
    tucker = LohaModule(w1_a=a1, w1_b=b1, w2_a=a2, w2_b=b2, alpha=2.0, t1=t1, t2=t2)
    assert tucker.weight_shape == (32, 32, 3, 3) and tucker.exact_shape
    _close(tucker.delta(), loha.diff_weight(b1, a1, b2, a2, t1, t2, gamma=0.5))


@pytest.mark.parametrize(
    "layout",
    ["full_full", "full_lowrank", "lowrank_lowrank", "conv_full", "conv_lowrank_flat", "conv_tucker"],
)
def test_lokr_layouts_match_lycoris_functional(layout):
    w1, w1a, w1b, w2, w2a, w2b, t2 = (None,) * 7
    if layout == "full_full":
        w1, w2 = _randn(8, 8, seed=1), _randn(8, 8, seed=2)
    elif layout == "full_lowrank":
        w1, w2a, w2b = _randn(4, 2, seed=1), _randn(16, 3, seed=2), _randn(3, 32, seed=3)
    elif layout == "lowrank_lowrank":
        w1a, w1b, w2a, w2b = (
            _randn(4, 3, seed=1),
            _randn(3, 2, seed=2),
            _randn(16, 3, seed=3),
            _randn(3, 32, seed=4),
        )
    elif layout == "conv_full":
        w1, w2 = _randn(4, 4, seed=1), _randn(8, 8, 3, 3, seed=2)
    elif layout == "conv_lowrank_flat":  # LyCORIS' module: w2_b flattened (r, d * kh * kw)
        w1, w2a, w2b = _randn(4, 4, seed=1), _randn(8, 3, seed=2), _randn(3, 72, seed=3)
    else:
        w1, w2a, w2b, t2 = (
            _randn(4, 4, seed=1),
            _randn(3, 8, seed=2),
            _randn(3, 8, seed=3),
            _randn(3, 3, 3, 3, seed=4),
        )
    module = LokrModule(alpha=1.5, w1=w1, w1_a=w1a, w1_b=w1b, w2=w2, w2_a=w2a, w2_b=w2b, t2=t2)
    rank = None if layout in ("full_full", "conv_full") else 3
    assert module.factor_rank == rank and module.factored == (rank is not None)
    scale = 1.0 if rank is None else 1.5 / 3  # two full matrices: alpha ignored, as LyCORIS does
    assert module.scale == scale
    expected = lokr.kron_weight(w1, w1a, w1b, w2, w2a, w2b, t2, scale=scale)
    _close(module.matrix(), expected.reshape(expected.shape[0], -1))
    if module.exact_shape:
        assert module.delta().shape == expected.shape


def test_tucker_locon_is_folded_exactly_at_load(micro_shapes):
    down, mid, up = _randn(4, 32, 1, 1, seed=1), _randn(4, 4, 3, 3, seed=2), _randn(32, 4, 1, 1, seed=3)
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {
        f"{stem}.lora_down.weight": down,
        f"{stem}.lora_mid.weight": mid,
        f"{stem}.lora_up.weight": up,
        f"{stem}.alpha": torch.tensor(2.0),
    }
    adapter = parse_adapter(tensors, {}, module_names=micro_shapes)
    module = adapter.modules[CONV]
    assert isinstance(module, LoraModule) and module.rank == 4 and module.down.shape == (4, 32, 3, 3)
    _close(module.delta(), locon.diff_weight(down, up, mid, gamma=0.5))
    validate_against_base(adapter, micro_shapes)


# ----------------------------------------------------------------- DoRA


@pytest.mark.parametrize("on_output", [True, False])
@pytest.mark.parametrize("shape", [(64, 48), (32, 16, 3, 3)])
@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_dora_rescale_matches_lycoris_on_both_axes(on_output, shape, weight):
    base = _randn(*shape, seed=1)
    down = _randn(4, *shape[1:], seed=2) * 0.1
    up = _randn(shape[0], 4, *([1, 1] if len(shape) == 4 else []), seed=3) * 0.1
    rows = base if on_output else base.transpose(0, 1)
    norms = rows.reshape(rows.shape[0], -1).norm(dim=1)
    dora = DoraScale(norms * (1 + 0.1 * _randn(norms.shape[0], seed=4)), "out" if on_output else "in")
    module = LoraModule(down=down, up=up, alpha=2.0, dora=dora)
    prepared = prepare_module(module, shape)
    got = add_update(base, combine([(prepared, weight)], base))
    expected = general._weight_decompose(base + module.delta(), dora.shaped(shape), weight, on_output)
    _close(got, expected, 1e-6)


def test_dora_axis_from_the_shape_or_the_files_network_args(micro_shapes):
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    factors = {f"{stem}.lora_down.weight": _randn(4, 64), f"{stem}.lora_up.weight": _randn(64, 4)}

    def axis(scale, args=None):
        metadata = {"ss_network_args": json.dumps(args)} if args else {}
        return (
            parse_adapter({**factors, f"{stem}.dora_scale": scale}, metadata, module_names=micro_shapes)
            .modules[Q]
            .dora.axis
        )

    assert axis(torch.ones(64, 1)) == "out"  # LyCORIS >= 3.2 (wd_on_output)
    assert axis(torch.ones(1, 64)) == "in"  # LyCORIS before 3.2, A1111, ComfyUI
    # A flat vector on a square weight says neither: ss_network_args decides, else A1111's rule.
    assert axis(torch.ones(64), {"algo": "locon", "dora_wd": True, "wd_on_output": "True"}) == "out"
    assert axis(torch.ones(64), {"algo": "locon", "dora_wd": True, "wd_on_output": "False"}) == "in"
    assert axis(torch.ones(64)) == "in"
    with pytest.raises(AdapterInvalid, match="neither one value per output row"):
        axis(torch.ones(1, 32))


def test_a_dora_blend_needs_the_base_weight():
    module = LoraModule(down=_randn(2, 8), up=_randn(8, 2), alpha=2.0, dora=DoraScale(torch.ones(8), "out"))
    with pytest.raises(InvalidArgument, match="base weight"):
        combine([(prepare_module(module, (8, 8)), 1.0)])


# ----------------------------------------------------------------- rank, validation, round trips


def _kinds(shapes) -> LoraAdapter:
    """One module of each kind (DoRA on the LoHa), on the micro model."""
    out, inp = shapes[Q]
    return LoraAdapter(
        modules={
            Q: LohaModule(
                w1_a=_randn(out, 4, seed=1),
                w1_b=_randn(4, inp, seed=2),
                w2_a=_randn(out, 4, seed=3),
                w2_b=_randn(4, inp, seed=4),
                alpha=2.0,
                dora=DoraScale(torch.rand(out) + 0.5, "out"),
            ),
            "unet.down_blocks.1.attentions.0.proj_in": LokrModule(
                alpha=4.0, w1=_randn(8, 8, seed=5), w2_a=_randn(8, 4, seed=6), w2_b=_randn(4, 8, 1, 1, seed=7)
            ),
            CONV: DiffModule(diff=_randn(*shapes[CONV], seed=8) * 0.01, bias=_randn(shapes[CONV][0], seed=9)),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": LoraModule(
                down=_randn(4, 32, seed=10), up=_randn(32, 4, seed=11), alpha=2.0
            ),
        }
    )


def test_every_kind_round_trips_through_canonical_and_kohya(micro_shapes):
    adapter = _kinds(micro_shapes)
    validate_against_base(adapter, micro_shapes)
    assert adapter.kind == "DoRA (LoRA + LoHa + LoKr + diff)"
    assert adapter.ranks == {4}  # the factored modules' network dims; the diff has none
    for writer in (save_canonical, to_kohya):
        again = load_adapter(writer(adapter), module_names=micro_shapes)
        assert again.modules.keys() == adapter.modules.keys()
        for key, module in adapter.modules.items():
            other = again.modules[key]
            assert type(other) is type(module)
            assert torch.equal(other.delta(), module.delta())
            assert (other.dora is None) == (module.dora is None)
            if module.dora is not None:
                assert other.dora.axis == module.dora.axis
                assert torch.equal(other.dora.magnitude, module.dora.magnitude)
        assert torch.equal(again.modules[CONV].bias, adapter.modules[CONV].bias)
    kohya = load_adapter(to_kohya(adapter), module_names=micro_shapes)
    assert kohya.metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(kohya.metadata["ss_network_args"])["dora_wd"] == "True"
    with pytest.raises(InvalidArgument, match="plain LoRA/LoCon only"):
        to_diffusers(adapter)


def test_rank_caps_apply_to_factored_kinds_only(micro_shapes):
    out, inp = micro_shapes[Q]
    # Above the weight's smaller dimension: accepted (LyCORIS' full preset does it on SD's conv_out),
    # and a LoRA of that rank is kept as its dense update, which is then smaller than its factors.
    wide = LoraModule(down=_randn(65, inp), up=_randn(out, 65), alpha=1.0)
    validate_against_base(LoraAdapter({Q: wide}), micro_shapes)
    prepared = prepare_module(wide, (out, inp))
    assert prepared.low_rank is None and prepared.nbytes == out * inp * 4
    _close(prepared.dense, wide.delta())
    narrow = LohaModule(
        w1_a=torch.ones(out, 8),
        w1_b=torch.ones(8, inp),
        w2_a=torch.ones(out, 8),
        w2_b=torch.ones(8, inp),
        alpha=1.0,
    )
    with pytest.raises(AdapterInvalid, match="limit of 4"):
        validate_against_base(LoraAdapter({Q: narrow}), micro_shapes, max_rank=4)
    # A diff and a LoKr of two full matrices have no rank to cap (their size is the weight's at most).
    full = {
        Q: DiffModule(diff=torch.ones(out, inp)),
        CONV: LokrModule(alpha=1.0, w1=torch.ones(4, 4), w2=torch.ones(8, 8, 3, 3)),
    }
    adapter = LoraAdapter(full)
    validate_against_base(adapter, micro_shapes, max_rank=1)
    assert adapter.ranks == {64, 32} and adapter.kind == "LoKr + diff"


def test_dense_kinds_cost_their_weight_when_prepared(micro_shapes):
    adapter = _kinds(micro_shapes)
    prepared = {key: prepare_module(module, micro_shapes[key]) for key, module in adapter.modules.items()}
    loha = prepared[Q]
    assert isinstance(loha, PreparedModule) and loha.low_rank is None
    assert loha.nbytes == 64 * 64 * 4 + 64 * 4  # the dense update and the DoRA magnitude
    lora = prepared["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    assert lora.dense is None and lora.nbytes == (4 * 32 + 32 * 4) * 4


# ----------------------------------------------------------------- per-part weights


def test_per_part_weights_in_the_signature():
    assert PartWeights.of(0.8) == 0.8 and PartWeights.of(0.8, text_encoder=0.8, unet=0.8) == 0.8
    assert PartWeights.of(0.8, text_encoder=0.0) == PartWeights(0.0, 0.8)
    plain = Blend.of([("a", 0.8)]).signature
    assert Blend.of([("a", PartWeights.of(text_encoder=0.8, unet=0.8))]).signature == plain
    assert Blend.of([("a", PartWeights(0.8, 0.5)), ("b", 1.0)]).signature == (
        ("a#te", 0.8),
        ("a#unet", 0.5),
        ("b", 1.0),
    )
    assert Blend.of([("a", PartWeights(0.0, 0.5))]).signature == (("a#unet", 0.5),)
    # One adapter named twice: the parts add, and equal parts are one weight again.
    assert Blend.of([("a", PartWeights(0.2, 0.5)), ("a", PartWeights(0.3, 0.0))]).signature == (("a", 0.5),)
    assert Blend.of([("a", PartWeights(0.5, -0.5)), ("a", PartWeights(-0.5, 0.5))]).is_empty
    assert f"{PartWeights(0.8, 0.5):g}" == "0.8:0.5"
    with pytest.raises(InvalidArgument, match="finite"):
        PartWeights(float("nan"), 1.0)


def test_a_merge_takes_doras_full_strength_change_as_its_task():
    from adapters.blend import Merge, merged_update

    base = _randn(16, 12, seed=1)
    magnitude = base.norm(dim=1) * 1.1
    dora = LoraModule(
        down=_randn(2, 12, seed=2), up=_randn(16, 2, seed=3), alpha=2.0, dora=DoraScale(magnitude, "out")
    )
    loha = LohaModule(
        w1_a=_randn(16, 2, seed=4),
        w1_b=_randn(2, 12, seed=5),
        w2_a=_randn(16, 2, seed=6),
        w2_b=_randn(2, 12, seed=7),
        alpha=1.0,
    )
    members = [(prepare_module(dora, (16, 12)), 1.0), (prepare_module(loha, (16, 12)), 0.5)]
    # PEFT's TIES on the task tensors: DoRA's is its full-strength change from the base.
    from peft.utils import merge_utils

    merged = merged_update(members, Merge("ties", 0.5), base).delta
    full_dora = general._weight_decompose(base + dora.delta(), dora.dora.shaped((16, 12)), 1.0, True)
    expected = merge_utils.ties([full_dora - base, loha.delta()], torch.tensor([1.0, 0.5]), 0.5, "total")
    _close(merged, expected, 1e-5)
