"""Validation against the base model's module shapes and architecture."""

from __future__ import annotations

import pytest
import torch

from adapters.canonical import BaseModelRef, LoraAdapter, LoraModule
from adapters.errors import AdapterIncompatible, AdapterInvalid
from adapters.formats import load_adapter, to_kohya
from adapters.validation import validate_against_base
from tests.adapters.corpus import make_adapter

MICRO = BaseModelRef("loraloom:micro")


def test_a_fitting_adapter_passes(micro_shapes):
    adapter = make_adapter(micro_shapes)
    validate_against_base(adapter, micro_shapes)
    adapter.base = BaseModelRef("loraloom:micro", "a" * 64)
    validate_against_base(
        adapter, micro_shapes, BaseModelRef("loraloom:micro", "b" * 64)
    )  # fingerprint differs


def test_architecture_mismatch_is_refused_only_when_both_sides_say(micro_shapes):
    adapter = make_adapter(micro_shapes)
    adapter.base = BaseModelRef("sdxl")
    with pytest.raises(
        AdapterIncompatible, match="made for a sdxl base model but this base model is loraloom:micro"
    ):
        validate_against_base(adapter, micro_shapes, MICRO)
    adapter.base = BaseModelRef("loraloom:tiny")  # another built-in size: its own architecture
    with pytest.raises(AdapterIncompatible, match="made for a loraloom:tiny base model"):
        validate_against_base(adapter, micro_shapes, MICRO)
    validate_against_base(adapter, micro_shapes)  # no base given: shapes decide
    adapter.base = None
    validate_against_base(adapter, micro_shapes, MICRO)  # no base recorded: shapes decide


def test_a_family_name_fits_every_base_of_that_family(micro_shapes):
    """A kohya file says ``sd_v1`` or ``sdxl_base_v1-0``; the built-in sizes are of a family, and the
    shapes decide the rest."""
    adapter = make_adapter(micro_shapes)
    adapter.base = BaseModelRef("sd_v1")
    validate_against_base(adapter, micro_shapes, MICRO)
    adapter.base = BaseModelRef("sdxl_base_v1-0")
    validate_against_base(adapter, micro_shapes, BaseModelRef("loraloom:tiny-sdxl"))
    with pytest.raises(AdapterIncompatible, match="made for a sdxl base model but this base model is sd_v2"):
        validate_against_base(adapter, micro_shapes, BaseModelRef("sd_v2"))


def test_kohya_architecture_spellings_are_normalized(micro_shapes):
    adapter = make_adapter(micro_shapes)
    adapter.base = BaseModelRef("sdxl_base_v1-0")
    with pytest.raises(AdapterIncompatible, match="made for a sdxl base model"):
        validate_against_base(adapter, micro_shapes, BaseModelRef("sd_v1"))
    validate_against_base(adapter, micro_shapes, BaseModelRef("stable-diffusion-xl-v1-base"))


def test_unknown_modules_and_shape_mismatches_are_listed_with_a_count(micro_shapes, tiny_pipeline):
    from server.models.shapes import module_shapes

    tiny = dict(module_shapes(tiny_pipeline))
    # A tiny-model adapter on every text-encoder and unet layer the micro model lacks or shapes differently.
    keys = tuple(k for k in tiny if k not in micro_shapes or tuple(tiny[k]) != tuple(micro_shapes[k]))
    adapter = load_adapter(to_kohya(make_adapter(tiny, keys=keys, rank=2)), module_names=tiny)
    with pytest.raises(AdapterIncompatible) as info:
        validate_against_base(adapter, micro_shapes, MICRO)
    message = str(info.value)
    unknown = [k for k in keys if k not in micro_shapes]
    mismatched = [k for k in keys if k in micro_shapes]
    assert unknown and mismatched
    assert f"{len(unknown)} module(s) not in the base model" in message
    assert f"{len(mismatched)} shape mismatch(es)" in message
    assert f"and {len(unknown) - 5} more" in message
    assert message.count("text_encoder.") + message.count("unet.") <= 10  # the first few, not all


def test_empty_and_rank_zero_adapters_are_invalid(micro_shapes):
    with pytest.raises(AdapterInvalid, match="no LoRA modules"):
        validate_against_base(LoraAdapter(modules={}), micro_shapes)
    key = "unet.down_blocks.1.attentions.0.proj_in"
    zero = LoraModule(down=torch.zeros(0, 64, 1, 1), up=torch.zeros(64, 0, 1, 1), alpha=1.0)
    with pytest.raises(AdapterInvalid, match="rank 0"):
        validate_against_base(LoraAdapter(modules={key: zero}), micro_shapes)


def test_conv_kernel_mismatch_is_a_shape_mismatch(micro_shapes):
    key = "unet.down_blocks.0.resnets.0.conv1"  # a 3x3 conv
    one_by_one = LoraModule(down=torch.ones(2, 32, 1, 1), up=torch.ones(32, 2, 1, 1), alpha=2.0)
    with pytest.raises(
        AdapterIncompatible, match=r"adapter updates \[32, 32, 1, 1\], base weight is \[32, 32, 3, 3\]"
    ):
        validate_against_base(LoraAdapter(modules={key: one_by_one}), micro_shapes)


def test_text_model_spelling_mismatch_gets_a_hint(micro_shapes):
    key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    module = make_adapter(micro_shapes, keys=(key,)).modules[key]
    flat = LoraAdapter(modules={"text_encoder.encoder.layers.0.self_attn.q_proj": module})
    with pytest.raises(AdapterIncompatible, match="load the adapter with module_names"):
        validate_against_base(flat, micro_shapes)
