"""``--cache-latents`` on the real tiny model, the VAE encoder and the text encoder counted.

With ``random_flip`` both mirror images of an image are encoded the first time it is drawn, so
the second epoch runs neither the VAE encoder nor (frozen) the text encoder, and a second run on
the same data folder runs neither at all, with the same losses. An uncached run draws the same
latents from the same distribution: its losses agree to float32 rounding (1e-5 relative).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from imagegen import make_folder

from server.models.loader import load_base_model
from trainer import TrainConfig, train
from trainer.cache import LatentCache, modules_fingerprint
from trainer.data import scan_dataset

pytestmark = pytest.mark.slow

IMAGES, BATCH = 8, 2
PER_EPOCH = IMAGES // BATCH


def counted_base():
    """The tiny model with counters on its VAE's ``encode`` (images encoded per call) and text encoder."""
    base = load_base_model("tiny")
    vae_calls: list[int] = []
    text_calls: list[int] = []
    encode = base.pipeline.vae.encode

    def counting_encode(pixels, *args, **kwargs):
        vae_calls.append(pixels.shape[0])
        return encode(pixels, *args, **kwargs)

    base.pipeline.vae.encode = counting_encode
    base.pipeline.text_encoder.register_forward_hook(lambda module, args, output: text_calls.append(1))
    return base, vae_calls, text_calls


def run(config: TrainConfig):
    base, vae_calls, text_calls = counted_base()
    at_epoch_end: list[tuple[int, int]] = []

    def on_step(info) -> None:
        if info.step % PER_EPOCH == 0:
            at_epoch_end.append((sum(vae_calls), len(text_calls)))

    result = train(config, base=base, on_step=on_step)
    return result, vae_calls, at_epoch_end


def test_the_second_epoch_and_a_second_run_never_run_the_vae_encoder(tmp_path, loraloom_home, one_thread):
    data = make_folder(tmp_path / "shapes", IMAGES, size=(40, 40))
    config = TrainConfig(
        data_dir=str(data), base="tiny", epochs=2, batch_size=BATCH, random_flip=True, cache_latents=True,
        lr=1e-3, seed=1, output_dir=str(tmp_path / "work"), no_register=True, progress=False,
    )  # fmt: skip
    first, vae_calls, epochs = run(config)
    assert first.steps == 2 * PER_EPOCH
    # Epoch 1: each image once, both flips in one call; 8 distinct captions, each encoded once.
    assert vae_calls == [2] * IMAGES and epochs[0] == (2 * IMAGES, IMAGES)
    assert epochs[1] == epochs[0]  # epoch 2: no VAE encoder, no text encoder
    cache = loraloom_home / "cache" / "trainer"
    assert len(list((cache / "latents").rglob("*.safetensors"))) == 2 * IMAGES
    assert len(list((cache / "text").rglob("*.safetensors"))) == IMAGES

    second, vae_calls, epochs = run(config)
    assert vae_calls == [] and epochs == [(0, 0), (0, 0)]
    assert second.losses == first.losses

    config.cache_latents = False
    uncached, vae_calls, _ = run(config)
    assert len(vae_calls) == 2 * PER_EPOCH  # one call per micro-batch
    torch.testing.assert_close(
        torch.tensor(uncached.losses), torch.tensor(first.losses), rtol=1e-5, atol=1e-6
    )


def test_a_latent_is_keyed_by_image_bytes_bucket_flip_and_vae(tmp_path, tiny_pipeline):
    data = make_folder(tmp_path / "a", 2, size=(40, 40))
    dataset = scan_dataset(data, resolution=32)
    vae = tiny_pipeline.vae
    fingerprint = modules_fingerprint([("vae", vae)])

    def cache(dataset, fingerprint=fingerprint) -> LatentCache:
        return LatentCache(
            dataset, lambda pixels: pixels, vae_fingerprint=fingerprint, dtype="f32", both_flips=True
        )

    key = cache(dataset).key(0, False)
    assert key != cache(dataset).key(0, True) and key != cache(dataset).key(1, False)
    copy = tmp_path / "b"
    shutil.copytree(data, copy)
    for path in copy.glob("img000.*"):  # the same bytes under another name: the same latent
        path.rename(path.with_name("renamed" + path.suffix))
    renamed = scan_dataset(copy, resolution=32)
    assert renamed.examples[1].image.name == "renamed.png" and cache(renamed).key(1, False) == key
    assert cache(scan_dataset(data, resolution=48)).key(0, False) != key  # another bucket
    torch.manual_seed(0)
    other = modules_fingerprint([("vae", type(vae).from_config(vae.config))])  # other weights
    assert other != fingerprint and cache(dataset, other).key(0, False) != key
    (data / "img000.png").write_bytes((data / "img001.png").read_bytes())  # edited: a new key
    assert cache(scan_dataset(data, resolution=32)).key(0, False) != key


@pytest.mark.gpu
def test_cached_latents_on_cuda_in_fp16_on_sdxl(tmp_path, loraloom_home):
    data = make_folder(tmp_path / "shapes", 4, size=(40, 40))
    config = TrainConfig(
        data_dir=str(data), base="tiny-sdxl", epochs=2, batch_size=2, random_flip=True, cache_latents=True,
        device="cuda", mixed_precision="fp16", lr=1e-3, output_dir=str(tmp_path / "work"), no_register=True,
        progress=False,
    )  # fmt: skip
    result = train(config)
    assert result.steps == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert len(list((loraloom_home / "cache" / "trainer" / "latents").rglob("*.safetensors"))) == 8
