"""Real LoRA files from diffusers, PEFT and the project's own writers load to the same deltas.

Tolerance: every loaded delta matches PEFT's own ``get_delta_weight`` and PEFT's
merged-minus-base weight within ``rtol=1e-5, atol=1e-6`` (float32; measured max
abs error ~6e-8). The project's own round trips are exact (``torch.equal``).
"""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch

from adapters.canonical import BaseModelRef, LoraAdapter
from adapters.errors import AdapterInvalid, InvalidArgument
from adapters.formats import detect_format, load_adapter, save_canonical, to_diffusers, to_kohya
from adapters.formats.base_ref import base_from_metadata
from adapters.safeparse import peek_header
from adapters.validation import validate_against_base
from tests.adapters.corpus import make_adapter

RTOL, ATOL = 1e-5, 1e-6


def _assert_deltas(adapter: LoraAdapter, reference: dict[str, torch.Tensor], expected_keys: set[str]) -> None:
    assert set(adapter.modules) == expected_keys
    for key, module in adapter.modules.items():
        torch.testing.assert_close(module.delta(), reference[key], rtol=RTOL, atol=ATOL, msg=key)


def _keys(made, component: str | None = None) -> set[str]:
    return {k for k in made.reference if component is None or k.startswith(component + ".")}


FILES = [
    ("diffusers", "diffusers", None),
    ("kohya_by_diffusers", "kohya", None),
    ("peft_unet", "peft", "unet"),
    ("peft_text_encoder", "peft", "text_encoder"),
]


@pytest.mark.parametrize(("name", "fmt", "component"), FILES)
def test_files_made_by_diffusers_and_peft_match_peft_deltas(made_lora, micro_shapes, name, fmt, component):
    path = made_lora.files[name]
    assert detect_format(path) == fmt
    adapter = load_adapter(path, module_names=micro_shapes)
    _assert_deltas(adapter, made_lora.reference, _keys(made_lora, component))
    _assert_deltas(adapter, made_lora.merged, _keys(made_lora, component))
    validate_against_base(adapter, micro_shapes, BaseModelRef("loraloom:micro"))
    assert any(module.is_conv and module.down.shape[2:] == (3, 3) for module in adapter.modules.values()) == (
        component != "text_encoder"
    )


@pytest.mark.parametrize(("name", "fmt", "component"), [f for f in FILES if f[1] != "kohya"])
def test_alpha_and_rank_patterns_are_honoured(made_lora_patterns, micro_shapes, name, fmt, component):
    """r=4, lora_alpha=8, rank_pattern {to_k: 2}, alpha_pattern {proj_in: 3}: from metadata / config."""
    adapter = load_adapter(made_lora_patterns.files[name], module_names=micro_shapes)
    _assert_deltas(adapter, made_lora_patterns.reference, _keys(made_lora_patterns, component))
    if component != "text_encoder":
        unet = {k: m for k, m in adapter.modules.items() if k.startswith("unet.")}
        assert {m.rank for k, m in unet.items() if k.endswith("to_k")} == {2}
        assert {m.alpha for k, m in unet.items() if k.endswith("proj_in")} == {3.0}
        assert {m.alpha for k, m in unet.items() if not k.endswith("proj_in")} == {8.0}


def test_all_formats_agree_with_each_other(made_lora, micro_shapes):
    diffusers = load_adapter(made_lora.files["diffusers"], module_names=micro_shapes)
    kohya = load_adapter(made_lora.files["kohya_by_diffusers"], module_names=micro_shapes)
    peft = {
        **load_adapter(made_lora.files["peft_unet"], module_names=micro_shapes).modules,
        **load_adapter(made_lora.files["peft_text_encoder"], module_names=micro_shapes).modules,
    }
    for key, module in diffusers.modules.items():
        assert torch.equal(module.delta(), kohya.modules[key].delta())
        assert torch.equal(module.delta(), peft[key].delta())


def test_canonical_kohya_canonical_is_exact(made_lora_patterns, micro_shapes):
    original = load_adapter(made_lora_patterns.files["diffusers"], module_names=micro_shapes)
    original.base = BaseModelRef("loraloom:micro", "ab" * 32)
    canonical = load_adapter(save_canonical(original))
    again = load_adapter(save_canonical(load_adapter(to_kohya(canonical), module_names=micro_shapes)))
    assert set(again.modules) == set(canonical.modules)
    for key, module in canonical.modules.items():
        other = again.modules[key]
        assert torch.equal(module.down, other.down) and torch.equal(module.up, other.up), key
        assert module.alpha == other.alpha and module.down.dtype == other.down.dtype
    assert again.base == canonical.base == original.base
    assert canonical.metadata.items() <= again.metadata.items()


def test_canonical_bytes_round_trip_exactly_and_deterministically(micro_shapes):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        adapter = make_adapter(micro_shapes, dtype=dtype, alpha=3.0)
        adapter.base = BaseModelRef("loraloom:micro")
        data = save_canonical(adapter)
        assert save_canonical(adapter) == data
        back = load_adapter(data)
        assert detect_format(data) == "canonical"
        assert back.base == adapter.base and back.metadata == adapter.metadata
        for key, module in adapter.modules.items():
            assert torch.equal(back.modules[key].down, module.down) and back.modules[key].down.dtype == dtype
            assert torch.equal(back.modules[key].up, module.up) and back.modules[key].alpha == 3.0


def test_canonical_header_layout(micro_shapes):
    adapter = make_adapter(micro_shapes)
    adapter.base = BaseModelRef("loraloom:micro", "f" * 64)
    tensors = safetensors.torch.load(save_canonical(adapter))
    metadata = peek_header(save_canonical(adapter)).metadata
    key = "unet.down_blocks.0.resnets.0.conv1"
    assert tensors[f"{key}.lora_down.weight"].shape == (4, 32, 3, 3)
    assert tensors[f"{key}.lora_up.weight"].shape == (32, 4, 1, 1)
    assert tensors[f"{key}.alpha"].dtype == torch.float32
    assert metadata["loraloom.format"] == "canonical/1"
    assert metadata["loraloom.base_architecture"] == "loraloom:micro"
    assert metadata["loraloom.base_fingerprint"] == "f" * 64
    assert metadata["ss_output_name"] == "corpus-0"


def test_kohya_output_uses_a1111_names_and_f32_alpha(micro_shapes):
    adapter = make_adapter(micro_shapes)
    adapter.base = BaseModelRef("sd_v1")
    data = to_kohya(adapter)
    tensors = safetensors.torch.load(data)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight" in tensors
    assert all(t.dtype == torch.float32 and t.dim() == 0 for k, t in tensors.items() if k.endswith(".alpha"))
    metadata = peek_header(data).metadata
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_base_model_version"] == "sd_v1"


def _fused_deltas(pipeline_factory, adapter: LoraAdapter, data: bytes, tmp_path) -> dict[str, torch.Tensor]:
    from server.models.shapes import lora_targets

    (tmp_path / "lora.safetensors").write_bytes(data)
    base = pipeline_factory()
    pipe = pipeline_factory()
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    before, after = lora_targets(base), lora_targets(pipe)
    untouched = [k for k in before if k not in adapter.modules]
    assert all(torch.equal(before[k].weight, after[k].weight) for k in untouched)
    return {k: (after[k].weight - before[k].weight).detach() for k in adapter.modules}


@pytest.mark.slow
def test_diffusers_loads_our_diffusers_and_kohya_files(made_lora_patterns, micro_shapes, tmp_path):
    """diffusers' own loader (``load_lora_weights`` + ``fuse_lora``) applies what we wrote.

    The kohya check is UNet-only: diffusers maps kohya text-encoder keys to the
    pre-transformers-5 attention names, which the flattened CLIPTextModel lacks.
    """
    from server.models.factory import build_pipeline

    adapter = load_adapter(made_lora_patterns.files["diffusers"], module_names=micro_shapes)

    def factory():
        return build_pipeline("micro", seed=0)

    fused = _fused_deltas(factory, adapter, to_diffusers(adapter), tmp_path)
    for key, module in adapter.modules.items():
        torch.testing.assert_close(fused[key], module.delta(), rtol=RTOL, atol=ATOL, msg=key)
    unet = LoraAdapter({k: m for k, m in adapter.modules.items() if k.startswith("unet.")})
    fused = _fused_deltas(factory, unet, to_kohya(unet), tmp_path)
    for key, module in unet.modules.items():
        torch.testing.assert_close(fused[key], module.delta(), rtol=RTOL, atol=ATOL, msg=key)


def test_our_diffusers_output_round_trips(micro_shapes):
    adapter = make_adapter(micro_shapes, alpha=5.0)
    for flat in (True, False):
        data = to_diffusers(adapter, flat_text_encoder=flat)
        keys = safetensors.torch.load(data)
        te = [k for k in keys if k.startswith("text_encoder.")]
        assert all(k.startswith("text_encoder.text_model.") != flat for k in te)
        back = load_adapter(data, module_names=micro_shapes)
        assert set(back.modules) == set(adapter.modules)
        for key, module in adapter.modules.items():
            assert torch.equal(back.modules[key].up, module.up) and back.modules[key].alpha == 5.0


def test_kohya_needs_module_names(made_lora):
    with pytest.raises(InvalidArgument, match="pass module_names"):
        load_adapter(made_lora.files["kohya_by_diffusers"])


def test_older_diffusers_layouts(micro_shapes):
    adapter = make_adapter(micro_shapes, rank=2)
    renamed = {}
    for key, module in adapter.modules.items():
        if key.endswith("attn1.to_q"):
            stem = key[: -len(".to_q")] + ".processor.to_q_lora"
            renamed[f"{stem}.down.weight"], renamed[f"{stem}.up.weight"] = module.down, module.up
        elif key.startswith("text_encoder."):
            renamed[f"{key}.lora_linear_layer.down.weight"] = module.down
            renamed[f"{key}.lora_linear_layer.up.weight"] = module.up
        else:
            renamed[f"{key}.lora.down.weight"], renamed[f"{key}.lora.up.weight"] = module.down, module.up
    back = load_adapter(safetensors.torch.save(renamed), module_names=micro_shapes)
    assert detect_format(safetensors.torch.save(renamed)) == "diffusers"
    assert set(back.modules) == set(adapter.modules)
    assert all(m.alpha == m.rank for m in back.modules.values())  # no alpha stored: diffusers' scale 1


def test_peft_rslora_and_config_argument(micro_shapes):
    adapter = make_adapter(micro_shapes, keys=("unet.down_blocks.1.attentions.0.proj_in",), rank=4)
    module = adapter.modules["unet.down_blocks.1.attentions.0.proj_in"]
    data = safetensors.torch.save(
        {
            "base_model.model.down_blocks.1.attentions.0.proj_in.lora_A.weight": module.down,
            "base_model.model.down_blocks.1.attentions.0.proj_in.lora_B.weight": module.up,
        }
    )
    back = load_adapter(data, peft_config={"r": 4, "lora_alpha": 6, "use_rslora": True, "peft_type": "LORA"})
    assert math.isclose(back.modules["unet.down_blocks.1.attentions.0.proj_in"].scale, 6 / math.sqrt(4))
    with pytest.raises(AdapterInvalid, match="peft_type LOHA"):
        load_adapter(data, peft_config={"r": 4, "lora_alpha": 4, "peft_type": "LOHA"})
    with pytest.raises(AdapterInvalid, match="DoRA"):
        load_adapter(data, peft_config={"r": 4, "lora_alpha": 4, "use_dora": True})


def test_peft_file_with_sibling_config(made_lora, micro_shapes):
    folder = made_lora.files["peft_unet"]
    config = json.loads((folder / "adapter_config.json").read_text())
    from_file = load_adapter(folder / "adapter_model.safetensors", module_names=micro_shapes)
    from_bytes = load_adapter(
        (folder / "adapter_model.safetensors").read_bytes(), module_names=micro_shapes, peft_config=config
    )
    assert set(from_file.modules) == set(from_bytes.modules) == _keys(made_lora, "unet")


def test_text_encoder_keys_with_and_without_text_model_level(micro_shapes):
    adapter = make_adapter(micro_shapes)
    key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    flat = {
        (k.replace("text_encoder.text_model.", "text_encoder.") + s): t
        for k, m in adapter.modules.items()
        for s, t in ((".lora_A.weight", m.down), (".lora_B.weight", m.up))
    }
    back = load_adapter(safetensors.torch.save(flat), module_names=micro_shapes)
    assert key in back.modules
    # Without the base's names the file's own spelling is kept.
    assert (
        "text_encoder.encoder.layers.0.self_attn.q_proj" in load_adapter(safetensors.torch.save(flat)).modules
    )


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (
            {"ss_base_model_version": "sd_v1", "ss_sd_model_hash": "e1441589"},
            BaseModelRef("sd_v1", "e1441589"),
        ),
        (
            {
                "ss_base_model_version": "sdxl_base_v1-0",
                "ss_new_sd_model_hash": "c" * 64,
                "ss_sd_model_hash": "x",
            },
            BaseModelRef("sdxl", "c" * 64),
        ),
        ({"ss_v2": "True"}, BaseModelRef("sd_v2", "")),
        ({"modelspec.architecture": "stable-diffusion-v1/lora"}, BaseModelRef("sd_v1", "")),
        (
            {"loraloom.base_architecture": "loraloom:tiny", "ss_base_model_version": "sd_v1"},
            BaseModelRef("loraloom:tiny"),
        ),
        ({"ss_output_name": "x"}, None),
    ],
)
def test_base_model_from_metadata(metadata, expected):
    assert base_from_metadata(metadata) == expected


def test_kohya_metadata_fills_base(micro_shapes):
    adapter = make_adapter(micro_shapes)
    adapter.metadata.update({"ss_base_model_version": "sd_v1", "ss_new_sd_model_hash": "d" * 64})
    back = load_adapter(to_kohya(adapter), module_names=micro_shapes)
    assert back.base == BaseModelRef("sd_v1", "d" * 64)


def test_sdxl_style_two_text_encoders_use_te1_te2():
    shapes = {
        "unet.down_blocks.1.attentions.0.proj_in": (64, 64, 1, 1),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (32, 32),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": (64, 64),
    }
    adapter = make_adapter(shapes, keys=tuple(shapes))
    tensors = safetensors.torch.load(to_kohya(adapter))
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors
    back = load_adapter(to_kohya(adapter), module_names=shapes)
    assert {k: m.weight_shape for k, m in back.modules.items()} == shapes
