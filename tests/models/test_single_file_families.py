"""Single-file SDXL (SGM layout) and SD 2.x (OpenCLIP) checkpoints: written by loraloom, read back
offline by diffusers' own converter, equal to the diffusers folder weight for weight and pixel for
pixel; files without loraloom's configs: family, prediction type and shapes told from the file."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from server.engine.denoise import denoise
from server.engine.types import GenerationSettings
from server.models import checkpoint_configs
from server.models.families import SD1, SD2, SDXL
from server.models.loader import BaseModelError, load_base_model
from server.models.single_file import checkpoint_family, pipeline_configs, save_single_file

OPEN_CLIP = "conditioner.embedders.1.model."
SETTINGS = GenerationSettings(
    prompt="a red circle on a blue square",
    negative_prompt="",
    width=64,
    height=64,
    steps=4,
    guidance_scale=7.5,
    seed=3,
    sampler="default",
    num_images=1,
)


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model load tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


class Saved:
    """A tiny model of one family saved both ways: a diffusers folder and a single file."""

    def __init__(self, name: str, root: Path) -> None:
        self.built = load_base_model(name)
        self.folder = root / f"{name}-folder"
        self.built.pipeline.save_pretrained(self.folder, safe_serialization=True)
        self.file = save_single_file(self.built.pipeline, root / f"{name}.safetensors")
        self.state = load_file(str(self.file))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each tiny model saved once for the whole module."""
    cache: dict[str, Saved] = {}

    def get(name: str) -> Saved:
        if name not in cache:
            cache[name] = Saved(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-sd2"])
def saved(request, built) -> Saved:
    return built(request.param)


@pytest.fixture(scope="module")
def sdxl(built) -> Saved:
    return built("tiny-sdxl")


@pytest.fixture(scope="module")
def sd2(built) -> Saved:
    return built("tiny-sd2")


def test_sdxl_file_is_in_sgm_layout(sdxl):
    state, pipeline = sdxl.state, sdxl.built.pipeline
    for key in (
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.ln_final.weight",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.token_embedding.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.label_emb.0.2.weight",
        # SDXL's first attention is in its second level, input block 4, as in the real model.
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight",
        "first_stage_model.decoder.mid.attn_1.q.weight",
    ):
        assert key in state, key
    assert not any(".self_attn." in key for key in state if key.startswith("conditioner.embedders.1."))
    assert not any(key.startswith(("unet.", "down_blocks.", "cond_stage_model.")) for key in state)
    encoder = pipeline.text_encoder_2.text_model.encoder.layers[0].self_attn
    fused = torch.cat([encoder.q_proj.weight, encoder.k_proj.weight, encoder.v_proj.weight])
    assert torch.equal(state[OPEN_CLIP + "transformer.resblocks.0.attn.in_proj_weight"], fused)
    projection = pipeline.text_encoder_2.text_projection.weight
    assert torch.equal(state[OPEN_CLIP + "text_projection"], projection.T)


def test_sd2_file_has_an_open_clip_encoder(sd2):
    state = sd2.state
    for key in (
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
        "cond_stage_model.model.transformer.resblocks.2.mlp.c_proj.bias",
        "cond_stage_model.model.ln_final.weight",
        "cond_stage_model.model.positional_embedding",
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    ):
        assert key in state, key
    assert not any(key.startswith("cond_stage_model.transformer.") for key in state)
    assert state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].dim() == 2  # linear projections


def test_single_file_loads_offline_to_the_folders_weights_and_image(saved, offline):
    from_file, from_folder = load_base_model(saved.file), load_base_model(saved.folder)
    assert from_file.family is from_folder.family is saved.built.family
    assert type(from_file.pipeline) is type(from_folder.pipeline)
    assert from_file.architecture == from_folder.architecture == saved.built.architecture
    for component in saved.built.family.weight_components:
        ours, theirs = (getattr(m.pipeline, component).state_dict() for m in (from_file, from_folder))
        assert ours.keys() == theirs.keys(), component
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), component
    assert from_file.fingerprint == from_folder.fingerprint == saved.built.fingerprint
    for tokenizer in saved.built.family.tokenizers:
        pads = (getattr(m.pipeline, tokenizer).pad_token for m in (from_file, from_folder))
        assert len(set(pads)) == 1, tokenizer
    schedulers = (
        {k: v for k, v in m.pipeline.scheduler.config.items() if not k.startswith("_")}
        for m in (from_file, from_folder)
    )
    assert next(schedulers) == next(schedulers)
    image = denoise(from_file.pipeline, SETTINGS, output_type="np").images
    assert np.array_equal(image, denoise(from_folder.pipeline, SETTINGS, output_type="np").images)


def test_prediction_type_is_the_files_unless_set(sd2):
    assert load_base_model(sd2.file).pipeline.scheduler.config.prediction_type == "v_prediction"
    forced = load_base_model(sd2.file, prediction_type="epsilon")
    assert forced.pipeline.scheduler.config.prediction_type == "epsilon"
    tiny = load_base_model("tiny", prediction_type="v_prediction")
    assert tiny.pipeline.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(BaseModelError, match="choose one of auto, epsilon, v_prediction"):
        load_base_model("tiny", prediction_type="v")


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (["conditioner.embedders.0.transformer.text_model.x", OPEN_CLIP + "ln_final.weight"], SDXL),
        (["model.diffusion_model.out.0.weight", "cond_stage_model.model.token_embedding.weight"], SD2),
        (["model.diffusion_model.out.0.weight", "cond_stage_model.transformer.text_model.x"], SD1),
        (["model.diffusion_model.out.0.weight"], SD1),
    ],
)
def test_family_from_keys(keys, family):
    assert checkpoint_family(keys) is family


def test_refiner_is_refused_by_name():
    with pytest.raises(BaseModelError, match="an SDXL refiner"):
        checkpoint_family(["conditioner.embedders.0.model.text_projection", "model.diffusion_model.x"])


def test_stripped_tiny_file_is_a_clear_error(saved, tmp_path):
    stripped = tmp_path / "stripped.safetensors"
    save_file(saved.state, str(stripped))  # no metadata: read with the published configs
    title = "SDXL base 1.0" if saved.built.family is SDXL else "SD 2.1 768-v"
    message = rf"without loraloom's embedded configs, so it is read as {title}, but its shapes differ"
    with pytest.raises(BaseModelError, match=message):
        load_base_model(stripped)


def test_file_without_configs_is_read_with_its_familys(saved, tmp_path, monkeypatch, offline):
    """The path of a real checkpoint: the family's published model index, scheduler and
    tokenizers (the published sizes swapped for the tiny's, so the weights fit)."""
    stripped = tmp_path / "stripped.safetensors"
    save_file(saved.state, str(stripped))
    published = checkpoint_configs.shipped

    def tiny_sized(family, prediction_type):
        title, configs = published(family, prediction_type)
        tiny = pipeline_configs(saved.built.pipeline)
        del tiny["tokenizers"]
        return title, {**tiny, "model_index": configs["model_index"], "scheduler": configs["scheduler"]}

    monkeypatch.setattr(checkpoint_configs, "shipped", tiny_sized)
    loaded = load_base_model(stripped)
    assert loaded.family is saved.built.family and loaded.fingerprint == saved.built.fingerprint
    pipeline = loaded.pipeline
    scheduler = (type(pipeline.scheduler).__name__, pipeline.scheduler.config.prediction_type)
    pads = [getattr(pipeline, name).pad_token for name in loaded.family.tokenizers]
    if loaded.family is SDXL:
        assert scheduler == ("EulerDiscreteScheduler", "epsilon") and pads == ["<|endoftext|>", "!"]
    else:  # no 768-v/512-base probe in a tiny UNet: v-prediction, as diffusers assumes
        assert scheduler == ("DDIMScheduler", "v_prediction") and pads == ["!"]


def _prediction_of(tmp_path, tensors, family, metadata=None) -> str:
    path = tmp_path / "probe.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        return checkpoint_configs.detect_prediction_type(handle, keys, family, handle.metadata() or {})


def test_prediction_type_told_from_a_file(tmp_path):
    probe = checkpoint_configs.SD2_V_PROBE
    generator = torch.Generator().manual_seed(0)
    wide, narrow = torch.randn(320, generator=generator) * 0.2, torch.randn(320, generator=generator) * 0.01
    assert _prediction_of(tmp_path, {probe: wide}, SD2) == "v_prediction"  # 768-v
    assert _prediction_of(tmp_path, {probe: narrow}, SD2) == "epsilon"  # 512-base
    assert _prediction_of(tmp_path, {"x": narrow}, SD2) == "v_prediction"  # unknown: as diffusers
    assert _prediction_of(tmp_path, {"x": narrow, "v_pred": torch.zeros(0)}, SDXL) == "v_prediction"
    spec = {checkpoint_configs.MODELSPEC_PREDICTION: "v"}
    assert _prediction_of(tmp_path, {"x": narrow}, SD1, spec) == "v_prediction"
    assert _prediction_of(tmp_path, {"x": narrow}, SDXL) == "epsilon"


def test_sd2_variants_differ_in_prediction_and_size():
    v_title, v = checkpoint_configs.shipped(SD2, "v_prediction")
    base_title, base = checkpoint_configs.shipped(SD2, "epsilon")
    assert (v_title, base_title) == ("SD 2.1 768-v", "SD 2.1 512-base")
    assert (v["unet"]["sample_size"], base["unet"]["sample_size"]) == (96, 64)
    predictions = (v["scheduler"]["prediction_type"], base["scheduler"]["prediction_type"])
    assert predictions == ("v_prediction", "epsilon")
    assert {k: x for k, x in v["unet"].items() if k != "sample_size"} == {
        k: x for k, x in base["unet"].items() if k != "sample_size"
    }
    assert v["text_encoder"] == base["text_encoder"]


@pytest.mark.parametrize(
    ("family", "sizes"),
    [
        # Published parameter counts: UNet, VAE, text encoder(s).
        (SDXL, dict(unet=2567463684, vae=83653863, text_encoder=123060480, text_encoder_2=694659840)),
        (SD2, dict(unet=865910724, vae=83653863, text_encoder=340387840)),
    ],
)
def test_shipped_configs_build_the_published_models(family, sizes):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _, configs = checkpoint_configs.shipped(family, "epsilon")
    with init_empty_weights():  # on the meta device: no memory, no time
        models = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        }
        if "text_encoder_2" in configs:
            second = CLIPTextConfig(**configs["text_encoder_2"])
            models["text_encoder_2"] = CLIPTextModelWithProjection(second)
    assert {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()} == sizes
