"""The trainer on SDXL (the factory's tiny-sdxl) and SD 2.x (tiny-sd2).

- A micro-batch's loss equals diffusers' SDXL / SD 2.x LoRA training step written out by hand:
  the pipeline's own ``encode_prompt`` (SDXL: both encoders' penultimate states and encoder 2's
  pooled embedding), ``add_time_ids`` from each image's original size, crop and bucket, and
  SD 2.x's v-prediction target. Tolerance: 1e-5 relative (float32, same kernels).
- The file a run on both text encoders writes is kohya's SDXL file (SGM names, ``lora_te1_``,
  ``lora_te2_``; ``ss_*`` and ``modelspec.*`` metadata), and diffusers'
  ``StableDiffusionXLPipeline.load_lora_weights`` + ``fuse_lora`` on it gives the weights loraloom's
  engine fuses from it (``rtol=1e-5, atol=1e-6``).
- ``loraloom train --base <tiny SDXL folder> --server HOST:PORT`` registers into a running server
  serving that folder, and the next Generate uses the adapter.
"""

from __future__ import annotations

import json
import random

import pytest
import safetensors
import torch
import torch.nn.functional as F
from imagegen import make_folder
from typer.testing import CliRunner

from server.models.shapes import lora_targets
from trainer import TrainConfig, train
from trainer.loop import Trainer, _derived_seed

pytestmark = pytest.mark.slow

RTOL, ATOL = 1e-5, 1e-6
# The fixture's images (cycled): wide, tall, square. At the tiny models' 64 px their buckets are
# 80x48, 48x80 and 64x64; SDXL's time ids, (original h, w, crop top, left, target h, w), written out
# by hand from the cover-then-center-crop rule: a wide 96x64 is resized to 80x53 and cropped 2 px
# from the top; a tall 64x96 to 53x80, cropped 2 px from the left (3 px once mirrored).
SIZES = [(96, 64), (64, 96), (80, 80)]
TIME_IDS = {
    ((96, 64), False): (64, 96, 2, 0, 48, 80),
    ((96, 64), True): (64, 96, 2, 0, 48, 80),
    ((64, 96), False): (96, 64, 0, 2, 80, 48),
    ((64, 96), True): (96, 64, 0, 3, 80, 48),
    ((80, 80), False): (80, 80, 0, 0, 64, 64),
    ((80, 80), True): (80, 80, 0, 0, 64, 64),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data") / "shapes", 6, sizes=SIZES)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory, tiny_sdxl_pipeline):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def config_for(data, tmp_path, **overrides) -> TrainConfig:
    options = dict(
        data_dir=str(data),
        name="shapes",
        base="tiny-sdxl",
        steps=1,
        batch_size=2,
        buckets=True,
        random_flip=True,
        seed=5,
        output_dir=str(tmp_path / "work"),
        no_register=True,
        progress=False,
    )
    options.update(overrides)
    return TrainConfig(**options)


def diffusers_step_loss(trainer: Trainer, micro_step: int) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """diffusers' LoRA training step (train_text_to_image_lora[_sdxl].py) on the trainer's micro-batch
    (same images, flips and captions, same seeded draws): returns the loss and the time ids used."""
    pipe, config, dataset = trainer.pipeline, trainer.config, trainer.dataset
    seed = _derived_seed(config.seed, micro_step)
    generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    items = dataset.draw(dataset.batch_at(micro_step, config.batch_size, config.seed), rng, random_flip=True)
    pixels = torch.stack([dataset.pixels(item.index, flip=item.flip) for item in items])
    captions = [item.caption for item in items]
    scheduler = trainer.noise_scheduler
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.sample(generator=generator)
        latents = latents * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(items),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        time_ids: list[tuple[int, ...]] = []
        if hasattr(pipe, "text_encoder_2"):
            embeds, _, pooled, _ = pipe.encode_prompt(
                captions, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            time_ids = [TIME_IDS[(dataset.examples[item.index].size, item.flip)] for item in items]
            added = {"text_embeds": pooled, "time_ids": torch.tensor(time_ids, dtype=embeds.dtype)}
            prediction = pipe.unet(noisy, timesteps, embeds, added_cond_kwargs=added).sample
        else:
            embeds, _ = pipe.encode_prompt(
                captions, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            prediction = pipe.unet(noisy, timesteps, embeds).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction, target), time_ids


@pytest.mark.parametrize("base", ["tiny-sdxl", "tiny-sd2"])
def test_a_micro_batch_is_diffusers_training_step(base, data, tmp_path, one_thread):
    trainer = Trainer(config_for(data, tmp_path, base=base))
    if base == "tiny-sd2":
        assert (
            trainer.family.name == "sd2" and trainer.noise_scheduler.config.prediction_type == "v_prediction"
        )
    else:
        assert trainer.family.name == "sdxl"
    seen: set[tuple[tuple[int, int], bool]] = set()
    for micro_step in range(12):  # enough batches to meet every bucket, mirrored and not
        expected, time_ids = diffusers_step_loss(trainer, micro_step)
        with torch.no_grad():
            loss = trainer.loss_on(micro_step)
        torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
        if base == "tiny-sdxl":
            rng = random.Random(_derived_seed(trainer.config.seed, micro_step))
            indices = trainer.dataset.batch_at(micro_step, 2, trainer.config.seed)
            items = trainer.dataset.draw(indices, rng, random_flip=True)
            ours = trainer.conditioning(items).time_ids
            assert ours.tolist() == [list(row) for row in time_ids]
            seen |= {(trainer.dataset.examples[item.index].size, item.flip) for item in items}
    if base == "tiny-sdxl":
        assert ((64, 96), True) in seen and ((64, 96), False) in seen  # the mirrored crop was met


def test_each_text_encoder_has_its_own_learning_rate_and_zero_freezes_it(data, tmp_path, one_thread):
    both = Trainer(
        config_for(
            data, tmp_path, train_text_encoder=True, lr=1e-3, text_encoder_lr=2e-4, text_encoder_2_lr=5e-5
        )
    )
    assert both.text_encoder_lrs == {"text_encoder": 2e-4, "text_encoder_2": 5e-5}
    assert [group["lr"] for group in both.optimizer.param_groups] == [1e-3, 2e-4, 5e-5]
    assert {key.split(".")[0] for key in both.network.layers} == {"unet", "text_encoder", "text_encoder_2"}
    assert both.text_cache is None  # trained encoders: nothing is cached
    only_second = Trainer(
        config_for(data, tmp_path, train_text_encoder=True, text_encoder_lr=0.0, text_encoder_2_lr=3e-4)
    )
    assert only_second.text_encoder_lrs == {"text_encoder_2": 3e-4}
    assert {key.split(".")[0] for key in only_second.network.layers} == {"unet", "text_encoder_2"}


@pytest.fixture(scope="module")
def trained_sdxl(tmp_path_factory, data, sdxl_folder, one_thread):
    root = tmp_path_factory.mktemp("sdxl-run")
    config = config_for(
        data,
        root,
        base=str(sdxl_folder),
        steps=4,
        rank=4,
        alpha=2.0,
        lr=1e-2,
        train_text_encoder=True,
        text_encoder_lr=1e-2,
        text_encoder_2_lr=5e-3,
        targets=["attn", "conv"],
        description="tiny SDXL shapes",
        no_register=False,
        store=str(root / "home"),
    )
    return train(config)


def test_the_sdxl_file_is_kohyas_with_ss_and_modelspec_metadata(trained_sdxl, sdxl_folder):
    result = trained_sdxl
    with safetensors.safe_open(str(result.path), "pt") as handle:
        names, meta = list(handle.keys()), handle.metadata()
    assert result.path.read_bytes() == result.data
    prefixes = {name.split("_")[0] + "_" + name.split("_")[1] for name in names}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert any(
        name.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for name in names
    )
    assert any(name.startswith("lora_unet_output_blocks_") for name in names)  # SGM names, not diffusers'
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_enable_bucket"] == "True"
    buckets = json.loads(meta["ss_bucket_info"])["buckets"].values()
    assert sorted(tuple(b["resolution"]) for b in buckets) == [(48, 80), (64, 64), (80, 48)]
    assert meta["ss_network_train_unet_only"] == "False" and meta["ss_text_encoder_lr"] == "0.01"
    assert meta["loraloom.text_encoder_2_lr"] == "0.005"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.title"] == "shapes" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.description"] == "tiny SDXL shapes"
    assert result.registration is not None and result.registration.ref == "shapes@1"


def test_diffusers_fuses_the_trained_file_to_loraloom_s_fused_weights(trained_sdxl, sdxl_folder):
    from diffusers import StableDiffusionXLPipeline

    from server.engine import Engine, MemoryResolver
    from server.models.loader import load_base_model

    peer = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, use_safetensors=True, local_files_only=True)
    before = {key: module.weight.detach().clone() for key, module in lora_targets(peer).items()}
    peer.load_lora_weights(str(trained_sdxl.path.parent), weight_name=trained_sdxl.path.name)
    peer.fuse_lora(lora_scale=1.0)
    peer.unload_lora_weights()
    theirs = {key: module.weight.detach() for key, module in lora_targets(peer).items()}

    resolver = MemoryResolver()
    resolver.add_bytes("shapes", trained_sdxl.data)
    engine = Engine(load_base_model(str(sdxl_folder)), resolver=resolver)
    engine.activate([("shapes", 1.0)])
    ours = {key: module.weight.detach() for key, module in lora_targets(engine.pipeline).items()}

    assert ours.keys() == theirs.keys()
    changed = {key.split(".")[0] for key in ours if not torch.equal(ours[key], before[key])}
    assert changed == {"unet", "text_encoder", "text_encoder_2"}  # the run trained all three
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=RTOL, atol=ATOL, msg=key)


def test_train_on_an_sdxl_folder_registers_into_a_server_and_the_next_generate_uses_it(
    tmp_path, data, sdxl_folder, one_thread
):
    from server.api.app import ServerThread
    from server.cli.main import app
    from server.client import Client
    from server.settings import Settings

    settings = Settings.of(
        host="127.0.0.1",
        port=0,
        model=str(sdxl_folder),
        home=tmp_path / "server-home",
        default_steps=4,
        log_level="WARNING",
    )
    with ServerThread(settings) as running:
        result = CliRunner().invoke(
            app,
            [
                "train", str(data), "--name", "xl-shapes", "--base", str(sdxl_folder), "--steps", "6",
                "--batch-size", "2", "--lr", "1e-2", "--targets", "attn,conv", "--buckets",
                "--cache-latents", "--trigger-word", "shp", "--output-dir", str(tmp_path / "work"),
                "--server", running.address, "--no-progress",
            ],
            env={"LORALOOM_HOME": str(tmp_path / "trainer-home")},
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"registered xl-shapes@1 in {running.address}" in result.output
        with Client(running.address, timeout=120) as client:
            info = client.get_adapter("xl-shapes")
            assert info.trigger_words == ("shp",) and info.training_metadata["steps"] == "6"
            plain = client.generate("red circle", steps=4, seed=7)
            adapted = client.generate("red circle", steps=4, seed=7, adapters=["xl-shapes"])
    assert len(adapted.images) == 1 and adapted.images[0].data
    assert adapted.images[0].data != plain.images[0].data


def test_an_sd2_run_records_sd2_and_v_prediction(data, tmp_path, one_thread):
    from adapters.formats import load_adapter

    result = train(config_for(data, tmp_path, base="tiny-sd2", steps=2, lr=1e-2))
    adapter = load_adapter(result.data)
    assert adapter.base is not None and adapter.base.architecture == "loraloom:tiny-sd2"
    meta = adapter.metadata
    assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_v2"] == "True"
    assert meta["ss_v_parameterization"] == "True" and meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert any(torch.count_nonzero(module.up) for module in adapter.modules.values())


def test_te_lr_flags_reach_the_config(tmp_path):
    from server.cli.main import app

    runner = CliRunner()
    for flag, field in (("--te-lr", "text_encoder_lr"), ("--te2-lr", "text_encoder_2_lr")):
        result = runner.invoke(app, ["train", str(tmp_path), flag, "-1", "--no-register"])
        assert result.exit_code == 2 and f"{field} must not be negative" in result.output
