"""Blending math: linear blends (dense and stacked low-rank), TIES and DARE against PEFT's own functions."""

from __future__ import annotations

import inspect

import pytest
import torch
from peft.utils import merge_utils

from adapters.blend import (
    Blend,
    BlendEntry,
    blend_delta,
    blend_deltas,
    dare_merge,
    iter_blend_deltas,
    stack_factors,
    stacked_adapter,
    ties_merge,
)
from adapters.canonical import LoraAdapter, LoraModule
from adapters.errors import AdapterIncompatible, InvalidArgument
from tests.adapters.corpus import DEFAULT_KEYS, make_adapter

RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture()
def trio(micro_shapes):
    """Three adapters of different ranks and dtypes; the third touches only two modules."""
    a = make_adapter(micro_shapes, rank=4, seed=1, alpha=2.0)
    b = make_adapter(micro_shapes, rank=2, seed=2, alpha=8.0, dtype=torch.float16)
    c = make_adapter(micro_shapes, keys=DEFAULT_KEYS[1:3], rank=3, seed=3)
    return [(a, 0.7), (b, -0.4), (c, 1.5)]


def _expected(weighted, key):
    total = None
    for adapter, weight in weighted:
        if key in adapter.modules:
            part = weight * adapter.modules[key].delta()
            total = part if total is None else total + part
    return total


def test_signature_is_sorted_and_equal_blends_match():
    one = Blend.of([("b" * 64, 0.5), ("a" * 64, -1.0)])
    two = Blend((BlendEntry("a" * 64, -1.0), BlendEntry("b" * 64, 0.5)))
    assert one.signature == two.signature == (("a" * 64, -1.0), ("b" * 64, 0.5))
    assert Blend.of([("a", 0.25), ("a", 0.5)]).signature == (("a", 0.75),)  # one blob named twice
    with pytest.raises(InvalidArgument, match="more than once"):
        Blend((BlendEntry("a", 1.0), BlendEntry("a", 2.0)))
    with pytest.raises(InvalidArgument, match="finite"):
        BlendEntry("a", float("nan"))
    assert Blend().is_empty and Blend().signature == ()


def test_linear_blend_dense_with_negative_weights(trio):
    deltas = blend_deltas(trio)
    assert set(deltas) == set(DEFAULT_KEYS)
    for key, delta in deltas.items():
        torch.testing.assert_close(delta, _expected(trio, key), rtol=RTOL, atol=ATOL)
    assert blend_delta(trio, "unet.conv_in") is None


def test_dense_deltas_are_yielded_one_module_at_a_time(trio):
    iterator = iter_blend_deltas(trio)
    assert inspect.isgenerator(iterator)
    key, delta = next(iterator)
    assert key == DEFAULT_KEYS[0] and delta.shape == (64, 64)


def test_stacked_factors_equal_the_dense_blend_without_dense_tensors(trio):
    stacked = stack_factors(trio)
    for key, module in stacked.items():
        ranks = sum(a.modules[key].rank for a, _ in trio if key in a.modules)
        assert module.rank == ranks and module.scale == 1.0
        assert module.down.numel() + module.up.numel() < module.delta().numel() or module.is_conv
        torch.testing.assert_close(module.delta(), _expected(trio, key), rtol=RTOL, atol=ATOL)
    conv = stacked["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.down.shape == (4 + 2 + 3, 32, 3, 3) and conv.up.shape == (32, 9, 1, 1)
    assert stacked_adapter(trio).modules.keys() == stacked.keys()


def test_blending_adapters_for_different_shapes_is_refused(micro_shapes):
    key = DEFAULT_KEYS[0]
    a = make_adapter(micro_shapes, keys=(key,))
    b = make_adapter({key: (32, 64)}, keys=(key,))
    with pytest.raises(AdapterIncompatible, match="disagree on the shape"):
        blend_deltas([(a, 1.0), (b, 1.0)])
    with pytest.raises(AdapterIncompatible):
        ties_merge([(a, 1.0), (b, 1.0)])


def _peft_tasks(weighted, key):
    shape = next(a.modules[key].weight_shape for a, _ in weighted if key in a.modules)
    return [a.modules[key].delta() if key in a.modules else torch.zeros(shape) for a, _ in weighted]


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_peft(trio, method, density):
    weights = torch.tensor([w for _, w in trio])
    merged = ties_merge(trio, density=density, majority_sign_method=method)
    for key, delta in merged.items():
        expected = merge_utils.ties(_peft_tasks(trio, key), weights, density, method)
        torch.testing.assert_close(delta, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("ties", [False, True])
def test_dare_matches_peft_with_the_same_random_stream(trio, ties):
    weights = torch.tensor([w for _, w in trio])
    merged = dare_merge(trio, density=0.6, ties=ties, seed=7)
    torch.manual_seed(7)  # PEFT draws its masks from the global generator, in the same order
    for key, delta in merged.items():
        tasks = _peft_tasks(trio, key)
        expected = (
            merge_utils.dare_ties(tasks, weights, 0.6)
            if ties
            else merge_utils.dare_linear(tasks, weights, 0.6)
        )
        torch.testing.assert_close(delta, expected, rtol=RTOL, atol=ATOL)


def test_dare_is_deterministic_in_its_seed(trio):
    first, again, other = dare_merge(trio, seed=1), dare_merge(trio, seed=1), dare_merge(trio, seed=2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    with pytest.raises(InvalidArgument, match="density"):
        dare_merge(trio, density=1.5)


def test_a_single_adapter_at_weight_one_is_its_own_delta(micro_shapes):
    adapter = make_adapter(micro_shapes)
    for key, delta in blend_deltas([(adapter, 1.0)]).items():
        assert torch.equal(delta, adapter.modules[key].delta())
    module = LoraModule(down=torch.ones(1, 4), up=torch.ones(4, 1), alpha=1.0)
    assert torch.equal(
        stack_factors([(LoraAdapter({"unet.x": module}), 0.0)])["unet.x"].delta(), torch.zeros(4, 4)
    )
