"""Through a real server: LyCORIS files (made by the lycoris-lora package) stored and served, what
``adapters show`` says about them, and per-part weights (text encoder, UNet) over gRPC."""

from __future__ import annotations

import grpc
import pytest
import torch
from typer.testing import CliRunner

from adapters.errors import InvalidArgument
from server.api.pb.loraloom.v1 import generate_pb2, service_pb2_grpc
from server.client import AdapterSpec
from tests.adapters.lycoris_files import write_lycoris

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uploaded(running, micro_pipeline, tmp_path_factory):
    """A LoHa with DoRA and a LoCon (attention layers of the text encoder and the UNet) in the store."""
    from server.client import Client

    folder = tmp_path_factory.mktemp("files")
    loha = write_lycoris(
        micro_pipeline, folder / "loha.safetensors", "loha", "attention", weight_decompose=True
    )
    locon = write_lycoris(micro_pipeline, folder / "locon.safetensors", "locon", "full", seed=2)
    with Client(running.address, timeout=60) as client:
        return {
            "loha": client.upload_adapter(loha, "hada"),
            "locon": client.upload_adapter(locon, "style"),
        }


def test_lycoris_files_are_stored_and_described(running, uploaded):
    from server.cli.main import app

    loha = uploaded["loha"]
    assert (loha.format, loha.rank, loha.architecture) == ("kohya", 8, "loraloom:micro")
    assert loha.metadata["loraloom.adapter_type"] == "DoRA (LoHa)"
    shown = CliRunner().invoke(app, ["adapters", "show", "hada", "--server", running.address])
    assert shown.exit_code == 0, shown.output
    lines = dict(
        line.split(None, 1) for line in shown.output.splitlines() if line.startswith(("format", "rank"))
    )
    assert lines == {"format": "DoRA (LoHa) (kohya file)", "rank": "8"}
    assert "made by       lycoris.kohya (algo=loha, weight_decompose=True, dora_wd=True)" in shown.output
    assert "base          loraloom:micro" in shown.output
    assert uploaded["locon"].metadata["loraloom.adapter_type"] == "LoCon"


def _parameters(engine):
    return {
        component: {
            name: p.detach().clone() for name, p in getattr(engine.pipeline, component).named_parameters()
        }
        for component in ("text_encoder", "unet")
    }


def test_text_encoder_weight_zero_leaves_the_text_encoder_bit_identical(
    running, client, uploaded, micro_pipeline
):
    engine = running.server.service.engine
    plain = client.generate("a red circle", steps=2, seed=4, adapters=["style:0.8"])
    unet_only = client.generate(
        "a red circle", steps=2, seed=4, adapters=[AdapterSpec("style", 0.8, text_encoder_weight=0.0)]
    )
    after = _parameters(engine)  # the engine keeps the last blend written
    for name, parameter in micro_pipeline.text_encoder.named_parameters():
        assert torch.equal(after["text_encoder"][name], parameter), name
    changed = [
        name for name, p in micro_pipeline.unet.named_parameters() if not torch.equal(after["unet"][name], p)
    ]
    assert changed
    assert unet_only.blend_signature != plain.blend_signature
    assert unet_only.images[0].data != plain.images[0].data
    (applied,) = unet_only.parameters.adapters
    assert applied.text_encoder_weight == 0.0 and applied.unet_weight == applied.weight == pytest.approx(0.8)
    assert applied.spec == "style@1:0:0.8"
    # The reported spec, the prompt tag, the te=/unet= forms and the raw wire fields: the same blend.
    for adapters, prompt in (
        ([applied.spec], "a red circle"),
        ([], "a red circle <lora:style:0:0.8>"),
        (["style:te=0:unet=0.8"], "a red circle"),
    ):
        again = client.generate(prompt, steps=2, seed=4, adapters=adapters)
        assert again.blend_signature == unet_only.blend_signature
        assert again.images[0].data == unet_only.images[0].data
    with grpc.insecure_channel(running.address) as channel:
        stub = service_pb2_grpc.LoraloomStub(channel)
        spec = generate_pb2.AdapterSpec(ref="style", weight=0.8, text_encoder_weight=0.0)
        response = stub.Generate(
            generate_pb2.GenerateRequest(prompt="a red circle", steps=2, seed=4, adapters=[spec])
        )
    assert response.blend_signature == unet_only.blend_signature
    assert response.parameters.adapters[0].HasField("text_encoder_weight")
    # Equal parts are the plain weight: the same signature as "style:0.8".
    same = client.generate("a red circle", steps=2, seed=4, adapters=["style:0.8:0.8"])
    assert (
        same.blend_signature == plain.blend_signature and not same.parameters.adapters[0].text_encoder_weight
    )


def test_per_part_weights_are_bounded_and_checked(client, uploaded):
    with pytest.raises(InvalidArgument, match="out of range"):
        client.generate("x", steps=1, seed=1, adapters=[AdapterSpec("style", 0.5, unet_weight=50.0)])
    with pytest.raises(InvalidArgument, match="bad adapter weight"):
        AdapterSpec.parse("style:0.5:0.5:0.5")
    assert AdapterSpec.parse("style@2:0.8:0.5").parts == (0.8, 0.5)
    assert AdapterSpec.parse("style:unet=0.5") == AdapterSpec(
        "style", 0.5, text_encoder_weight=1.0, unet_weight=0.5
    )


def test_a_loha_blended_with_a_locon_is_served(client, uploaded):
    base = client.generate("a red circle", steps=2, seed=4)
    blended = client.generate("a red circle", steps=2, seed=4, adapters=["hada:0.7", "style:0.8:0.4"])
    assert blended.images[0].data != base.images[0].data
    assert [item.ref for item in blended.parameters.adapters] and len(blended.parameters.adapters) == 2
