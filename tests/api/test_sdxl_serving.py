"""SDXL end to end: ``loraloom serve --model <tiny SDXL folder>``, adapters uploaded and images drawn
with the CLI, compared with diffusers' ``StableDiffusionXLPipeline`` + ``load_lora_weights`` +
``fuse_lora`` on the same folder (the issue's parity acceptance)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.canonical import BaseModelRef
from adapters.formats import to_diffusers, to_kohya
from server.api.codegen import REPO_ROOT
from server.client import Client
from server.engine.synthetic import random_adapter
from server.models.shapes import module_shapes
from tests.serving import Serving

STEPS, SEED, PROMPT = 4, 11, "a lighthouse at dusk"


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli.main", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def sdxl_served(tmp_path_factory, tiny_sdxl_pipeline):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline.save_pretrained(folder, safe_serialization=True)
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "LORALOOM_HOME": str(home)}
    server = Serving(
        "--model", str(folder), "--backend", "torch", "--precision", "fp32", "--no-warmup", env=env
    )
    try:
        env["LORALOOM_SERVER"] = server.address()
        with Client(env["LORALOOM_SERVER"], timeout=60) as client:
            client.wait_ready(120)
        yield folder, env
    finally:
        server.kill()


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory, tiny_sdxl_pipeline):
    """A kohya (SGM names) file and a diffusers file for the tiny SDXL, both touching every part."""
    shapes = module_shapes(tiny_sdxl_pipeline)
    folder = tmp_path_factory.mktemp("adapters")
    kohya = random_adapter(shapes, seed=5, rank=4, strength=0.6, base=BaseModelRef("sdxl"))
    diffusers = random_adapter(shapes, seed=6, rank=2, strength=0.6)
    (folder / "ink.safetensors").write_bytes(to_kohya(kohya, module_names=shapes))
    (folder / "neon").mkdir()
    (folder / "neon" / "pytorch_lora_weights.safetensors").write_bytes(to_diffusers(diffusers))
    sd1 = random_adapter(shapes, seed=7, rank=2, strength=0.6, base=BaseModelRef("sd_v1"))
    (folder / "sd1.safetensors").write_bytes(to_kohya(sd1, module_names=shapes))
    return folder


def diffusers_image(folder, loras: list[tuple[str, object, float]]) -> np.ndarray:
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    if loras:
        for name, path, _ in loras:
            pipeline.load_lora_weights(str(path), adapter_name=name)
        pipeline.set_adapters([name for name, _, _ in loras], [weight for _, _, weight in loras])
        pipeline.fuse_lora(adapter_names=[name for name, _, _ in loras], lora_scale=1.0)
    image = pipeline(
        PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, generator=[torch.Generator().manual_seed(SEED)]
    ).images[0]
    return np.asarray(image).astype(int)


def served_image(env, tmp_path, *adapters: str) -> np.ndarray:
    out = tmp_path / "out.png"
    args = ["generate", PROMPT, "--steps", str(STEPS), "--seed", str(SEED), "-o", str(out), "--no-progress"]
    for adapter in adapters:
        args += ["--adapter", adapter]
    result = cli(*args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


def test_the_cli_on_a_served_sdxl_folder_draws_what_diffusers_draws(sdxl_served, adapter_files, tmp_path):
    folder, env = sdxl_served
    info = cli("info", env=env)
    assert info.returncode == 0 and "sdxl family" in info.stdout and "64 px" in info.stdout, info.stdout
    for name, path in (("ink", adapter_files / "ink.safetensors"), ("neon", adapter_files / "neon")):
        upload = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
        done = cli("adapters", "upload", str(upload), "--name", name, env=env)
        assert done.returncode == 0, done.stdout + done.stderr

    cases = [
        ((), []),
        (("ink:0.7",), [("ink", adapter_files / "ink.safetensors", 0.7)]),
        (("neon:0.8",), [("neon", adapter_files / "neon", 0.8)]),
        (
            ("ink:0.7", "neon:0.5"),
            [("ink", adapter_files / "ink.safetensors", 0.7), ("neon", adapter_files / "neon", 0.5)],
        ),
    ]
    for asked, loras in cases:
        ours = served_image(env, tmp_path, *asked)
        theirs = diffusers_image(folder, loras)
        assert np.abs(ours - theirs).max() <= 1, asked


def test_an_sd1_adapter_is_refused_on_the_sdxl_server_and_nothing_is_registered(sdxl_served, adapter_files):
    _, env = sdxl_served
    refused = cli("adapters", "upload", str(adapter_files / "sd1.safetensors"), "--name", "sd1", env=env)
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert "FailedPrecondition" in said and "use a sdxl adapter" in said, said
    assert "made for a sd_v1 base model" in said and "loraloom:tiny-sdxl (sdxl family)" in said, said
    listed = cli("adapters", "list", "--json", env=env)
    assert listed.returncode == 0 and '"sd1"' not in listed.stdout
