"""One loader for built-in names, diffusers folders and SD 1.x single files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from server.models.loader import BaseModelError, load_base_model
from server.models.single_file import save_single_file


def _image(pipeline, seed: int = 3) -> np.ndarray:
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    generator = torch.Generator().manual_seed(seed)
    return pipeline(
        "a blue square", num_inference_steps=3, height=size, width=size, generator=generator, output_type="np"
    ).images[0]


@pytest.fixture(scope="module")
def micro():
    return load_base_model("micro")


@pytest.fixture(scope="module")
def saved_folder(micro, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "micro-folder"
    micro.pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def test_builtin_model_facts(micro):
    assert micro.architecture == "loraloom:micro"
    assert micro.resolution == 32
    assert len(micro.fingerprint) == 64
    assert micro.fingerprint == load_base_model("micro").fingerprint
    shapes = micro.module_shapes
    assert any(key.startswith("unet.") and key.endswith("attn2.to_k") for key in shapes)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in shapes
    assert all(not p.requires_grad for p in micro.pipeline.unet.parameters())


def test_diffusers_folder_reloads_to_the_same_image(micro, saved_folder):
    loaded = load_base_model(saved_folder)
    assert loaded.architecture == "loraloom:micro"
    assert loaded.fingerprint == micro.fingerprint
    assert np.array_equal(_image(loaded.pipeline), _image(micro.pipeline))


def test_single_file_reloads_to_the_same_image(micro, tmp_path):
    path = save_single_file(micro.pipeline, tmp_path / "micro.safetensors")
    loaded = load_base_model(path)
    assert loaded.fingerprint == micro.fingerprint
    assert np.array_equal(_image(loaded.pipeline), _image(micro.pipeline))


def test_missing_path_says_what_to_give(tmp_path):
    with pytest.raises(BaseModelError, match="not found: give a diffusers folder"):
        load_base_model(tmp_path / "nope")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(BaseModelError, match="model_index.json is missing"):
        load_base_model(tmp_path)


def test_incomplete_folder_names_the_missing_part(saved_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(BaseModelError, match="incomplete: missing vae/"):
        load_base_model(broken)


def test_folder_with_pickle_weights_is_refused(saved_folder, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(saved_folder, pickled)
    for weights in (pickled / "unet").glob("*.safetensors"):
        weights.unlink()
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(BaseModelError, match=r"only pickle weights .*Convert it once, offline"):
        load_base_model(pickled)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickle_checkpoints_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(BaseModelError, match=r"refusing pickle checkpoint .*safetensors"):
        load_base_model(path)


def test_pickle_renamed_to_safetensors_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(BaseModelError, match="pickle/zip archive named .safetensors"):
        load_base_model(path)


def test_unrelated_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(BaseModelError, match="not a loadable SD 1.x, SD 2.x or SDXL checkpoint"):
        load_base_model(path)


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]}, "SDXL refiner"),
        ({"_class_name": "KandinskyV22Pipeline"}, "is a KandinskyV22Pipeline folder"),
    ],
)
def test_a_folder_of_another_pipeline_is_refused_saying_what_is_served(tmp_path, index, message):
    import json

    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(BaseModelError, match=message):
        load_base_model(tmp_path)
