"""Files written by the lycoris-lora package's own code, served by the engine: the fused weights
equal the package's own merge, module by module, and blends of mixed kinds swap exactly.

The files (``lycoris_files.write_lycoris``) are made at test time on the tiny SD-topology
model with dim 8 and alpha 4 (so the alpha/dim scale matters), with LyCORIS' attention-only
and full presets. The reference is ``lycoris.utils.merge`` at weight 0.8; on LoHa, and on
LoKr modules with a low-rank factor, that merge applies alpha/dim twice (see
``lycoris_files``), so there the reference is the package's own module forward, and the
test pins the merge's difference down to exactly that factor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.blend import PartWeights
from adapters.canonical import DiffModule, LoraAdapter
from adapters.errors import AdapterIncompatible
from adapters.formats import load_adapter
from adapters.store.validation import facts_of
from adapters.validation import validate_against_base
from server.engine import Engine, MemoryResolver
from server.engine.types import GenerateRequest
from server.models.shapes import lora_targets, module_shapes
from tests.adapters.lycoris_files import DIM, peer_forward, peer_merge, target_tensors, worst_relative
from tests.adapters.lycoris_files import write_lycoris as write
from tests.engine.conftest import base_from

pytestmark = pytest.mark.slow

WEIGHT = 0.8
TOLERANCE = 2e-6  # relative to each tensor's largest value: float32 rounding (measured <= 3e-7)

# name -> (algo, network options, LoraAdapter.kind)
KINDS = {
    "locon": ("locon", {}, "LoCon"),
    "tucker_locon": ("locon", {"use_tucker": True}, "LoCon"),
    "loha": ("loha", {}, "LoHa"),
    "lokr": ("lokr", {}, "LoKr"),
    "dora": ("locon", {"weight_decompose": True}, "DoRA (LoCon)"),
    "diff": ("full", {}, "diff"),
}
ATTENTION_ONLY = {"dora_loha": ("loha", {"weight_decompose": True}, "DoRA (LoHa)")}
ATTENTION_ONLY["dora_lokr"] = ("lokr", {"weight_decompose": True}, "DoRA (LoKr)")
CASES = [(kind, preset) for kind in KINDS for preset in ("attention", "full")]
CASES += [(kind, "attention") for kind in ATTENTION_ONLY]
# Kinds whose lycoris-lora merge applies alpha/dim twice where a module has a low-rank factor.
DOUBLE_SCALED = {"loha", "lokr", "dora_loha", "dora_lokr"}


@pytest.fixture(scope="module")
def files(tiny_pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lycoris")
    made = {}
    for kind, preset in CASES:
        algo, options, _ = {**KINDS, **ATTENTION_ONLY}[kind]
        made[(kind, preset)] = write(
            tiny_pipeline, folder / f"{kind}-{preset}.safetensors", algo, preset, **options
        )
    return made


def _engine(pipeline, files: dict[str, object]) -> Engine:
    resolver = MemoryResolver()
    for name, path in files.items():
        resolver.add_file(name, path)
    return Engine(base_from(pipeline), resolver=resolver)


@pytest.mark.parametrize(("kind", "preset"), CASES)
def test_fused_weights_equal_the_peers_merge(tiny_pipeline, files, kind, preset):
    path = files[(kind, preset)]
    shapes = module_shapes(tiny_pipeline)
    adapter = load_adapter(path, module_names=shapes)
    validate_against_base(adapter, shapes)
    label = {**KINDS, **ATTENTION_ONLY}[kind][2]
    if preset == "attention":  # linear layers only: LoRA, not LoCon
        label = {"LoCon": "LoRA", "DoRA (LoCon)": "DoRA"}.get(label, label)
    assert adapter.kind == label
    assert all(module.rank == DIM for module in adapter.modules.values() if module.factored)
    assert all(module.factored for module in adapter.modules.values()) == (
        kind not in ("lokr", "dora_lokr", "diff")
    )
    engine = _engine(tiny_pipeline, {"x": path})
    engine.activate([("x", WEIGHT)])
    ours = target_tensors(engine.pipeline)
    base = target_tensors(tiny_pipeline)
    touched = {key for key in ours if not torch.equal(ours[key], base[key])}
    assert touched and {key.removesuffix(".bias") for key in touched} == set(adapter.modules)
    merged = target_tensors(peer_merge(tiny_pipeline, [(path, WEIGHT)]))
    if kind not in DOUBLE_SCALED:
        worst, where = worst_relative(merged, ours)
        assert worst < TOLERANCE, (where, worst)
        return
    forward = target_tensors(peer_forward(tiny_pipeline, [(path, WEIGHT)]))
    worst, where = worst_relative(forward, ours)
    assert worst < TOLERANCE, (where, worst)
    # The package's merge differs from its forward (and from loraloom) by one more alpha/dim on the
    # modules with low-rank factors, and agrees elsewhere (a LoKr of two full matrices: scale 1).
    for key in touched:
        module = adapter.modules[key]
        same = worst_relative({key: merged[key]}, {key: ours[key]})[0] < TOLERANCE
        assert same == (module.scale == 1.0), key
        if module.scale != 1.0 and module.dora is None:
            twice = {key: module.scale * (ours[key] - base[key])}
            assert worst_relative({key: merged[key] - base[key]}, twice)[0] < 1e-5, key


def test_store_facts_say_what_the_file_is(tiny_pipeline, files):
    shapes = module_shapes(tiny_pipeline)
    facts = facts_of(load_adapter(files[("dora_loha", "attention")], module_names=shapes), "kohya")
    assert facts.rank == DIM and facts.metadata["loraloom.adapter_type"] == "DoRA (LoHa)"
    # LoKr on these small attention layers: two full matrices each, no network dim to record.
    lokr = facts_of(load_adapter(files[("lokr", "attention")], module_names=shapes), "kohya")
    assert lokr.metadata["loraloom.adapter_type"] == "LoKr" and lokr.rank == 64
    assert facts.metadata["ss_network_module"] == "lycoris.kohya"
    full = facts_of(load_adapter(files[("diff", "full")], module_names=shapes), "kohya")
    assert full.metadata["loraloom.adapter_type"] == "diff" and full.components == ("text_encoder", "unet")


def test_a_loha_and_lokr_blend_equals_the_peers_sequential_merge(tiny_pipeline, files):
    loha, lokr = files[("loha", "full")], files[("lokr", "full")]
    engine = _engine(tiny_pipeline, {"loha": loha, "lokr": lokr})
    engine.activate([("loha", 0.7), ("lokr", -0.4)])
    expected = target_tensors(peer_forward(tiny_pipeline, [(loha, 0.7), (lokr, -0.4)]))
    worst, where = worst_relative(expected, target_tensors(engine.pipeline))
    assert worst < TOLERANCE, (where, worst)


def test_a_dora_and_lora_blend_rescales_the_blended_weight_as_the_peer_merges_dora_last(tiny_pipeline, files):
    lora, dora = files[("locon", "full")], files[("dora", "full")]
    engine = _engine(tiny_pipeline, {"lora": lora, "dora": dora})
    engine.activate([("dora", 0.8), ("lora", 0.5)])
    ours = target_tensors(engine.pipeline)
    expected = target_tensors(peer_merge(tiny_pipeline, [(lora, 0.5), (dora, 0.8)]))
    worst, where = worst_relative(expected, ours)
    assert worst < TOLERANCE, (where, worst)
    # The peer's result depends on the order it merges in; loraloom's blend is the DoRA-last one.
    other = target_tensors(peer_merge(tiny_pipeline, [(dora, 0.8), (lora, 0.5)]))
    assert worst_relative(other, ours)[0] > 100 * TOLERANCE


def test_mixed_kinds_swap_a_to_b_to_a_bit_exactly_and_reproduce_by_request(tiny_pipeline, files):
    names = {
        "loha": files[("loha", "full")],
        "lokr": files[("lokr", "attention")],
        "dora": files[("dora", "full")],
        "diff": files[("diff", "full")],
        "tucker": files[("tucker_locon", "full")],
    }
    engine = _engine(tiny_pipeline, names)
    base = {key: value.clone() for key, value in target_tensors(engine.pipeline).items()}
    first = [("loha", 0.8), ("dora", PartWeights(0.3, 0.6)), ("diff", 0.5)]
    second = [("lokr", 1.0), ("tucker", -0.5), ("dora", 0.9)]

    def image(blend):
        request = GenerateRequest(prompt="a red square", steps=2, seed=3, adapters=list(blend))
        result = engine.generate(request)
        return np.asarray(result.images[0]), result.blend_signature, target_tensors(engine.pipeline)

    a_image, a_signature, a_weights = image(first)
    a_weights = {key: value.clone() for key, value in a_weights.items()}
    b_image, b_signature, _ = image(second)
    image([])
    assert all(torch.equal(value, base[key]) for key, value in target_tensors(engine.pipeline).items())
    again_image, again_signature, again_weights = image(first)
    assert again_signature == a_signature != b_signature
    assert np.array_equal(again_image, a_image) and not np.array_equal(a_image, b_image)
    assert all(torch.equal(again_weights[key], a_weights[key]) for key in a_weights)
    # A fresh engine given the same request writes the same weights and draws the same image.
    fresh = _engine(tiny_pipeline, names)
    request = GenerateRequest(prompt="a red square", steps=2, seed=3, adapters=list(first))
    result = fresh.generate(request)
    assert result.blend_signature == a_signature and np.array_equal(np.asarray(result.images[0]), a_image)
    assert all(torch.equal(value, a_weights[key]) for key, value in target_tensors(fresh.pipeline).items())


def test_dense_kinds_are_counted_in_the_adapter_cache(tiny_pipeline, files):
    engine = _engine(tiny_pipeline, {"loha": files[("loha", "full")], "locon": files[("locon", "full")]})
    shapes = module_shapes(tiny_pipeline)
    loha = engine.load("loha")
    weights = sum(int(np.prod(shapes[key])) * 4 for key in shapes)  # it touches every target
    assert loha.size_bytes >= weights
    locon = engine.load("locon")
    assert locon.size_bytes < weights / 4
    assert engine.stats().used_bytes == loha.size_bytes + locon.size_bytes


def test_text_encoder_weight_zero_leaves_the_text_encoder_bit_identical(tiny_pipeline, files):
    engine = _engine(tiny_pipeline, {"x": files[("loha", "full")]})
    base = {key: value.clone() for key, value in target_tensors(engine.pipeline).items()}
    blend, _, _ = engine.activate([("x", PartWeights(0.0, 0.8))])
    assert blend.signature[0][0].endswith("#unet")
    weights = target_tensors(engine.pipeline)
    for key, value in weights.items():
        if key.startswith("text_encoder"):
            assert torch.equal(value, base[key]), key
        elif not key.endswith(".bias"):  # a LoHa changes no bias
            assert not torch.equal(value, base[key]), key
    # UNet only at 0.8 equals the whole adapter at 0.8 on the UNet.
    whole = _engine(tiny_pipeline, {"x": files[("loha", "full")]})
    whole.activate([("x", 0.8)])
    for key, value in target_tensors(whole.pipeline).items():
        if key.startswith("unet"):
            assert torch.equal(value, weights[key]), key


def test_a_bias_difference_for_a_layer_without_bias_is_refused(tiny_pipeline):
    key = next(key for key, module in lora_targets(tiny_pipeline).items() if module.bias is None)
    shape = module_shapes(tiny_pipeline)[key]
    resolver = MemoryResolver()
    resolver.add_adapter(
        "x", LoraAdapter({key: DiffModule(diff=torch.zeros(shape), bias=torch.ones(shape[0]))})
    )
    engine = Engine(base_from(tiny_pipeline), resolver=resolver)
    with pytest.raises(AdapterIncompatible, match="a layer without a bias"):
        engine.activate([("x", 1.0)])
