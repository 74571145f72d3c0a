"""SDXL adapter files: kohya's SGM UNet names, two text encoders and ``text_projection``, checked
against diffusers' own converters and pipeline on the factory's tiny SDXL (SDXL's block layout:
3 levels, 2 layers per block, up block 2 without attention).

Tolerance: fused weights match ``W0 + scale * up @ down`` within ``rtol=1e-5, atol=1e-6``
(float32); names and tensors that only move between files are compared exactly.
"""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from adapters.canonical import BaseModelRef, LoraAdapter
from adapters.errors import AdapterIncompatible, InvalidArgument
from adapters.formats import load_adapter, sgm, to_diffusers, to_kohya
from adapters.safeparse import peek_header
from server.engine.synthetic import random_adapter

RTOL, ATOL = 1e-5, 1e-6
TINY_SDXL = BaseModelRef("loraloom:tiny-sdxl")

# Module keys of the tiny SDXL and the names kohya's sd-scripts give them, written out by hand from
# SDXL's SGM numbering (they are real SDXL names: the tiny model has SDXL's layout).
HAND_SGM = {
    "unet.conv_in": "lora_unet_input_blocks_0_0",
    "unet.time_embedding.linear_1": "lora_unet_time_embed_0",
    "unet.add_embedding.linear_2": "lora_unet_label_emb_0_2",
    "unet.down_blocks.0.resnets.1.conv1": "lora_unet_input_blocks_2_0_in_layers_2",
    "unet.down_blocks.0.downsamplers.0.conv": "lora_unet_input_blocks_3_0_op",
    "unet.down_blocks.1.resnets.0.conv_shortcut": "lora_unet_input_blocks_4_0_skip_connection",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    ),
    "unet.down_blocks.1.downsamplers.0.conv": "lora_unet_input_blocks_6_0_op",
    "unet.down_blocks.2.attentions.1.transformer_blocks.1.ff.net.2": (
        "lora_unet_input_blocks_8_1_transformer_blocks_1_ff_net_2"
    ),
    "unet.mid_block.attentions.0.proj_in": "lora_unet_middle_block_1_proj_in",
    "unet.mid_block.resnets.1.time_emb_proj": "lora_unet_middle_block_2_emb_layers_1",
    "unet.up_blocks.0.resnets.2.conv2": "lora_unet_output_blocks_2_0_out_layers_3",
    "unet.up_blocks.0.upsamplers.0.conv": "lora_unet_output_blocks_2_2_conv",
    "unet.up_blocks.1.attentions.2.proj_out": "lora_unet_output_blocks_5_1_proj_out",
    "unet.up_blocks.1.upsamplers.0.conv": "lora_unet_output_blocks_5_2_conv",
    "unet.up_blocks.2.resnets.0.conv_shortcut": "lora_unet_output_blocks_6_0_skip_connection",
    "unet.conv_out": "lora_unet_out_2",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    ),
    "text_encoder_2.text_model.encoder.layers.1.mlp.fc1": "lora_te2_text_model_encoder_layers_1_mlp_fc1",
    "text_encoder_2.text_projection": "lora_te2_text_projection",
}


@pytest.fixture(scope="module")
def sdxl():
    from server.models.factory import build_pipeline

    return build_pipeline("tiny-sdxl", seed=0)


@pytest.fixture(scope="module")
def shapes(sdxl) -> dict[str, tuple[int, ...]]:
    from server.models.shapes import module_shapes

    return dict(module_shapes(sdxl))


def every_module(shapes, *, seed: int = 3, base: BaseModelRef | None = TINY_SDXL) -> LoraAdapter:
    """A LoRA/LoCon on every layer (attention, ff, proj_in/out, resnet convs, samplers, embeddings,
    both text encoders, text_projection), ranks 2 and 3 alternating, alpha 1.5 (scale != 1)."""
    keys = sorted(shapes)
    modules = {}
    for rank, targets in ((2, keys[::2]), (3, keys[1::2])):
        part = random_adapter(shapes, seed=seed + rank, rank=rank, alpha=1.5, targets=targets, strength=0.1)
        modules.update(part.modules)
    return LoraAdapter(modules=modules, metadata={"ss_output_name": "every-module"}, base=base)


def diffusers_conversion(
    kohya: bytes, unet_config
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """What diffusers makes of a kohya file (SGM blocks mapped with the UNet's config, kohya names
    converted, then PEFT names, as ``load_lora_weights`` does): module key -> (down, up); and the
    converted state dict before the PEFT names (diffusers' older layouts, ``text_encoder_2`` too)."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    state = _maybe_map_sgm_blocks_to_diffusers(dict(safetensors.torch.load(kohya)), unet_config)
    converted, _alphas = _convert_non_diffusers_lora_to_diffusers(state)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        part = {
            k.removeprefix(f"{component}."): v for k, v in converted.items() if k.split(".")[0] == component
        }
        if component == "unet":
            part = convert_unet_state_dict_to_peft(part)
        else:
            # Named as diffusers does for a file with every attention projection (its guess needs one).
            part = convert_state_dict_to_peft(
                convert_state_dict_to_diffusers(part, StateDictType.DIFFUSERS_OLD)
            )
        for key, tensor in part.items():
            module, _, role = key.rpartition(".lora_")
            factors.setdefault(f"{component}.{module}", {})[role.removesuffix(".weight")] = tensor
    return {key: (roles["A"], roles["B"]) for key, roles in factors.items()}, converted


def test_sgm_names_follow_the_ldm_layout_of_each_family(sdxl, shapes, micro_pipeline):
    """The SGM map, derived from module names alone, equals the config-driven LDM renaming of the
    single-file checkpoint writer, on SDXL's layout and on SD 1.x's and SD 2.x's (whose up block 0
    has no attention: its upsampler is in slot 1)."""
    from server.models.factory import build_pipeline
    from server.models.shapes import module_shapes

    try:
        from server.models.ldm_keys import unet_key
    except ImportError:  # before the checkpoint writer's key map had a module of its own
        from server.models.single_file import _rename_unet_key as unet_key

    for pipeline in (sdxl, micro_pipeline, build_pipeline("tiny-sd2", seed=0)):
        names = list(module_shapes(pipeline))
        layout = sgm.layout_of(names)
        config = dict(pipeline.unet.config)
        assert layout is not None and layout.layers_per_block == config["layers_per_block"]
        unet = [key.removeprefix("unet.") for key in names if key.startswith("unet.")]
        for path in unet:
            if not path.startswith("add_embedding.") or config["addition_embed_type"] == "text_time":
                assert sgm.to_sgm(path, layout) == unet_key(path + ".weight", config)[: -len(".weight")], path
        assert len(unet) > 80
    assert sgm.layout_of(shapes) == sgm.SDXL_LAYOUT


def test_to_kohya_writes_what_diffusers_reads_as_the_same_modules(sdxl, shapes):
    """Every module, written with SGM names, is mapped by diffusers' own converters to the module key
    loraloom's reader gives, with the same factors; loraloom reads back the adapter exactly."""
    adapter = every_module(shapes)
    data = to_kohya(adapter, module_names=shapes)
    stems = {key.split(".")[0] for key in safetensors.torch.load(data)}
    assert not any(marker in stem for stem in stems for marker in ("down_blocks", "up_blocks", "mid_block"))
    assert {stem.split("_")[1] for stem in stems} == {"unet", "te1", "te2"}
    assert peek_header(data).metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    ours = load_adapter(data, module_names=shapes)
    assert set(ours.modules) == set(adapter.modules) == set(shapes)
    theirs, older_layout = diffusers_conversion(data, sdxl.unet.config)
    assert set(theirs) == set(ours.modules)
    # diffusers' older layouts (``.lora.down``, ``processor.to_q_lora``, ``lora_linear_layer``) read too.
    older = load_adapter(safetensors.torch.save(older_layout), module_names=shapes)
    assert set(older.modules) == set(ours.modules)
    for key, module in ours.modules.items():
        original = adapter.modules[key]
        assert torch.equal(module.down, original.down) and torch.equal(module.up, original.up), key
        assert module.alpha == original.alpha == 1.5
        down, up = theirs[key]
        assert torch.equal(down, module.down) and torch.equal(up, module.up), key
        assert torch.equal(older.modules[key].down, module.down), key
    # Without the base's names: the adapter covers every layer, so its keys tell the layout.
    assert to_kohya(adapter) == data


def test_a_hand_made_sgm_file_reads_into_diffusers_module_keys(sdxl, shapes):
    """A kohya SDXL file named by hand reads into the right modules, diffusers agrees, and
    ``to_kohya`` writes the same names back."""
    generator = torch.Generator().manual_seed(5)
    tensors: dict[str, torch.Tensor] = {}
    for key, stem in HAND_SGM.items():
        shape = shapes[key]
        tensors[f"{stem}.lora_down.weight"] = torch.randn((4, *shape[1:]), generator=generator)
        up_shape = (shape[0], 4, *([1] * (len(shape) - 2)))
        tensors[f"{stem}.lora_up.weight"] = torch.randn(up_shape, generator=generator)
        tensors[f"{stem}.alpha"] = torch.tensor(2.0)
    data = safetensors.torch.save(tensors, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    adapter = load_adapter(data, module_names=shapes)
    assert set(adapter.modules) == set(HAND_SGM)
    assert adapter.base == BaseModelRef("sdxl")
    for key, stem in HAND_SGM.items():
        assert torch.equal(adapter.modules[key].down, tensors[f"{stem}.lora_down.weight"]), key
        assert adapter.modules[key].alpha == 2.0
    assert set(diffusers_conversion(data, sdxl.unet.config)[0]) == set(HAND_SGM)
    written = {key.split(".")[0] for key in safetensors.torch.load(to_kohya(adapter, module_names=shapes))}
    assert written == set(HAND_SGM.values())


def test_kohya_names_of_sd1_files_still_read_and_sgm_needs_a_layout(shapes):
    """The diffusers-flat UNet names (kohya's SD 1.x spelling) read on the SDXL base too; without the
    base's names an adapter whose keys contradict SDXL's layout and do not tell their own is refused."""
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    module = every_module(shapes).modules[key]
    flat = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    data = safetensors.torch.save(
        {f"{flat}.lora_down.weight": module.down, f"{flat}.lora_up.weight": module.up}
    )
    assert set(load_adapter(data, module_names=shapes).modules) == {key}
    deep = every_module({"unet.down_blocks.0.resnets.2.conv1": (4, 4, 3, 3)}, base=BaseModelRef("sdxl"))
    with pytest.raises(InvalidArgument, match="pass module_names"):
        to_kohya(deep)
    written = safetensors.torch.load(to_kohya(deep, module_names=["unet.down_blocks.0.resnets.2.conv1"]))
    assert {key.split(".")[0] for key in written} == {"lora_unet_input_blocks_3_0_in_layers_2"}


def _fused(pipeline, data: bytes, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    from server.models.shapes import lora_targets

    (tmp_path / "lora.safetensors").write_bytes(data)
    pipe = copy.deepcopy(pipeline)
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    saved = tmp_path / "saved"  # what diffusers loaded, written by diffusers' own writer
    layers = {
        c: get_peft_model_state_dict(getattr(pipe, c), adapter_name="default_0")
        for c in ("unet", "text_encoder", "text_encoder_2")
    }
    StableDiffusionXLPipeline.save_lora_weights(
        saved,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
        unet_lora_adapter_metadata=pipe.unet.peft_config["default_0"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default_0"].to_dict(),
        text_encoder_2_lora_adapter_metadata=pipe.text_encoder_2.peft_config["default_0"].to_dict(),
    )
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    weights = {key: module.weight.detach() for key, module in lora_targets(pipe).items()}
    return weights, saved / "pytorch_lora_weights.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["kohya", "diffusers"])
def test_the_sdxl_pipeline_fuses_our_files_to_our_weights(sdxl, shapes, writer, tmp_path):
    """``StableDiffusionXLPipeline.load_lora_weights`` + ``fuse_lora`` on our kohya (SGM) and diffusers
    files gives every UNet, text-encoder and text-encoder-2 weight as ``W0 + scale * up @ down`` from
    loraloom's parse; what diffusers then saves (its own SDXL writer) reads back to the same adapter."""
    from server.models.shapes import lora_targets

    adapter = every_module(shapes)
    flat = not hasattr(sdxl.text_encoder, "text_model")
    data = (
        to_kohya(adapter, module_names=shapes)
        if writer == "kohya"
        else to_diffusers(adapter, flat_text_encoder=flat)
    )
    parsed = load_adapter(data, module_names=shapes)
    before = {key: module.weight.detach() for key, module in lora_targets(sdxl).items()}
    fused, saved = _fused(sdxl, data, tmp_path)
    for key, module in parsed.modules.items():
        expected = before[key] + module.matrix().reshape(before[key].shape)
        torch.testing.assert_close(fused[key], expected, rtol=RTOL, atol=ATOL, msg=key)
    again = load_adapter(saved, module_names=shapes)
    assert set(again.modules) == set(parsed.modules)
    for key, module in again.modules.items():
        torch.testing.assert_close(
            module.matrix(), parsed.modules[key].matrix(), rtol=RTOL, atol=ATOL, msg=key
        )


def test_to_diffusers_keeps_text_model_on_text_encoder_2(shapes):
    """transformers >= 5.6 flattened ``CLIPTextModel`` but not ``CLIPTextModelWithProjection``: a
    flat file drops ``text_model.`` from ``text_encoder`` only; both spellings read back."""
    keys = (
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_projection",
    )
    adapter = every_module({k: shapes[k] for k in keys})
    for flat in (True, False):
        data = to_diffusers(adapter, flat_text_encoder=flat)
        names = {key.rsplit(".lora_", 1)[0] for key in safetensors.torch.load(data)}
        first = "text_encoder.encoder" if flat else "text_encoder.text_model.encoder"
        assert names == {
            f"{first}.layers.0.self_attn.q_proj",
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
            "text_encoder_2.text_projection",
        }
        assert set(load_adapter(data, module_names=shapes).modules) == set(keys)


def test_a_peft_folder_of_text_encoder_2_is_read_as_text_encoder_2(sdxl, shapes, tmp_path):
    """PEFT's own writer (``save_pretrained``) for SDXL's second text encoder: its module paths are
    the first encoder's too, but only ``text_encoder_2`` has them all (``text_projection``)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=2, lora_alpha=3, target_modules=["q_proj", "fc1", "text_projection"], init_lora_weights=False
    )
    model = get_peft_model(copy.deepcopy(sdxl.text_encoder_2), config)
    model.save_pretrained(tmp_path / "te2")
    adapter = load_adapter(tmp_path / "te2", module_names=shapes)
    assert adapter.components == {"text_encoder_2"}
    assert "text_encoder_2.text_projection" in adapter.modules
    assert all(module.alpha == 3 for module in adapter.modules.values())


def test_adapters_show_says_sdxl_for_an_sdxl_kohya_file(shapes, tmp_path):
    """A kohya SDXL file (``ss_base_model_version = sdxl_base_v1-0``) stored on the tiny SDXL base is
    recorded, sent and shown as made for ``sdxl``; an SD 1.x file is refused naming both."""
    from adapters.store import AdapterStore
    from adapters.store.validation import make_validator
    from server.api.convert import adapter_version
    from server.cli.main import _describe
    from server.client.convert import adapter_info

    adapter = every_module(shapes, base=None)
    adapter.metadata.update({"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora"})
    store = AdapterStore.open(tmp_path, validator=make_validator(shapes, TINY_SDXL))
    version = store.register("xl", to_kohya(adapter, module_names=shapes))
    assert version.base_architecture == "sdxl"
    rows = {
        line[:14].strip(): line[14:]
        for line in _describe(adapter_info(adapter_version(version))).splitlines()
    }
    assert rows["base"] == "sdxl"
    assert rows["format"] == "LoCon (kohya file)" and rows["made by"] == "networks.lora"
    assert set(rows["components"].split(", ")) == {"unet", "text_encoder", "text_encoder_2"}
    sd1 = every_module(
        {k: shapes[k] for k in sorted(shapes) if k.startswith("unet.down_blocks.1.")}, base=None
    )
    sd1.metadata["ss_base_model_version"] = "sd_v1"
    with pytest.raises(
        AdapterIncompatible, match="made for a sd_v1 base model but this base model is loraloom:tiny-sdxl"
    ):
        store.register("sd1", to_kohya(sd1))
    assert [item.ref for item in store.list().items] == ["xl@1"]


@pytest.mark.slow
def test_the_convert_command_writes_each_format_for_the_tiny_sdxl(shapes, tmp_path):
    """``loraloom adapters convert`` loads the base locally: a diffusers SDXL file becomes kohya (SGM
    names), that one canonical; an SD 1.x adapter is refused naming both architectures."""
    from server.cli.main import app

    adapter = every_module(shapes)
    source = tmp_path / "in.safetensors"
    source.write_bytes(to_diffusers(adapter))
    runner = CliRunner()
    out = tmp_path / "out" / "kohya.safetensors"
    result = runner.invoke(
        app, ["adapters", "convert", str(source), str(out), "--to", "kohya", "--base", "tiny-sdxl"]
    )
    assert result.exit_code == 0, result.output
    assert "kohya, LoCon, 300 modules" in result.output and "for loraloom:tiny-sdxl" in result.output
    written, expected = (safetensors.torch.load(data) for data in (out.read_bytes(), to_kohya(adapter)))
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in written)
    back = tmp_path / "back.safetensors"
    result = runner.invoke(
        app, ["adapters", "convert", str(out), str(back), "--to", "canonical", "--base", "tiny-sdxl"]
    )
    assert result.exit_code == 0, result.output
    again = load_adapter(back)
    assert set(again.modules) == set(adapter.modules) and again.base == TINY_SDXL
    sd1 = every_module(
        {k: shapes[k] for k in shapes if k.startswith("unet.mid_block.")}, base=BaseModelRef("sd_v1")
    )
    source.write_bytes(to_kohya(sd1))
    result = runner.invoke(
        app, ["adapters", "convert", str(source), str(back), "--to", "kohya", "--base", "tiny-sdxl"]
    )
    assert result.exit_code == 1
    assert "made for a sd_v1 base model but this base model is loraloom:tiny-sdxl" in " ".join(
        result.output.split()
    )
    assert not list(tmp_path.rglob("*.partial"))
