"""img2img and inpainting through a real server on the toy model, and the CLI's --init-image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from server.cli.main import app
from tests.api.helpers import micro_config


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory):
    from server.api.app import ServerThread
    from server.bootstrap import build_service

    config = micro_config(tmp_path_factory.mktemp("home"), model="toy", default_steps=20)
    with ServerThread(config, build_service) as thread:
        yield thread


@pytest.fixture()
def client(toy_server):
    from server.client import Client

    with Client(toy_server.address, timeout=120) as connected:
        yield connected


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture() -> Image.Image:
    """A blue square on white: what the toy draws, so distances mean something."""
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste((30, 60, 220), (16, 16, 48, 48))
    return image


def pil(image) -> Image.Image:
    return Image.open(io.BytesIO(image.data)).convert("RGB")


def distance(image, reference: Image.Image) -> float:
    return float(np.abs(np.asarray(image).astype(float) - np.asarray(reference).astype(float)).mean())


def test_strength_moves_the_image_away_from_the_picture_monotonically(client):
    init = picture()
    distances = []
    for strength in (0.2, 0.4, 0.6, 0.8):
        result = client.generate(
            "a large red circle on a white background",
            init_image=png(init),
            strength=strength,
            seed=5,
            num_images=4,
        )
        assert result.parameters.strength == pytest.approx(strength)
        distances.append(np.mean([distance(pil(image), init) for image in result.images]))
    assert distances == sorted(distances) and distances[0] < distances[-1] / 2, distances


def test_strength_one_equals_txt2img(client):
    txt2img = client.generate("a small green triangle on a gray background", seed=9)
    full = client.generate(
        "a small green triangle on a gray background", seed=9, init_image=png(picture()), strength=1.0
    )
    assert txt2img.images[0].data == full.images[0].data


def test_inpainting_keeps_unmasked_pixels_within_the_vae_round_trip(client):
    from server.engine.start import encode_images
    from server.models.loader import load_base_model

    init = picture()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    result = client.generate(
        "a large red circle on a white background",
        init_image=png(init),
        mask_image=png(mask),
        strength=1.0,
        seed=3,
    )
    assert len(result.parameters.mask_image_sha256) == 64
    out = np.asarray(pil(result.images[0])).astype(float)
    # The VAE's own round trip of the picture bounds what latent masking can keep.
    import torch

    pipeline = load_base_model("toy").pipeline
    tensor = pipeline.image_processor.preprocess(init).float()
    latents = encode_images(
        pipeline.vae,
        tensor,
        [torch.Generator().manual_seed(3)],
        dtype=torch.float32,
        device=torch.device("cpu"),
    )  # the server's seed: the same VAE sample
    with torch.inference_mode():
        decoded = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor, return_dict=False)[0]
    round_trip = np.asarray(pipeline.image_processor.postprocess(decoded, output_type="pil")[0]).astype(float)
    kept = np.asarray(mask) == 0
    vae_error = np.abs(round_trip - np.asarray(init))[kept].max()
    assert vae_error > 0
    assert np.abs(out - np.asarray(init))[kept].max() <= vae_error  # in fact 0: the overlay
    inside = out[26:38, 26:38]
    assert np.abs(inside - np.asarray(init)[26:38, 26:38]).mean() > 20  # the hole was repainted


def test_a_bad_picture_is_invalid_argument(client):
    from adapters.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="not a PNG or JPEG"):
        client.generate("a circle", init_image=b"\x89PNG broken")


def test_the_cli_restyles_a_picture(toy_server, tmp_path):
    source = tmp_path / "in.png"
    picture().save(source)
    out = tmp_path / "out.png"
    command = [
        "generate",
        "a large red circle on a white background",
        "--init-image",
        str(source),
        "--strength",
        "0.5",
        "--seed",
        "4",
        "--server",
        toy_server.address,
        "--output",
        str(out),
        "--no-progress",
    ]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "--strength 0.5" in result.output
    assert Image.open(out).size == (64, 64)
