"""Every network type trained a few steps on the tiny model, then served: the engine's fused weights
equal the trainer's own merge, and the file says what it is.

Each run trains through ``trainer.train`` on a private copy of the tiny factory model
(``base=``), so the PEFT layers stay in that copy afterwards; PEFT's own ``merge``
(what ``merge_and_unload`` does per layer) then writes the trained network into its base
weights. The exported file is registered in a store and served by an Engine (a
MemoryResolver, as ``tests/engine``): its fused weights must equal that merge to float32
rounding. For LoHa, LoKr and DoRA the file is also written in kohya names (``to_kohya``)
and applied by the lycoris-lora package's own module code (``tests/adapters/lycoris_files``),
which must agree as well: the trained factors mean to LyCORIS what they meant to PEFT.
"""

from __future__ import annotations

import json

import pytest
import torch
from imagegen import make_folder
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from typer.testing import CliRunner

from adapters.errors import FailedPrecondition, InvalidArgument
from adapters.formats import load_adapter, to_kohya
from adapters.safeparse import read_safetensors
from adapters.store import AdapterStore
from adapters.validation import validate_against_base
from server.cli.main import adapter_type
from server.engine import Engine, MemoryResolver
from server.models.shapes import lora_targets, module_shapes
from tests.adapters.lycoris_files import peer_forward, target_tensors, worst_relative
from tests.engine.conftest import base_from
from trainer import TrainConfig, train

pytestmark = pytest.mark.slow

TOLERANCE = 2e-6  # relative to each tensor's largest value: float32 rounding
# name -> (network, dora, targets, train_text_encoder, what load_adapter / adapters show call it)
CASES = {
    "lora": ("lora", False, ["attn"], False, "LoRA"),
    "locon": ("locon", False, ["attn"], False, "LoCon"),
    "loha": ("loha", False, ["attn", "conv"], True, "LoHa"),
    "lokr": ("lokr", False, ["attn", "conv"], False, "LoKr"),
    "dora": ("lora", True, ["attn"], True, "DoRA"),
    "dora_locon": ("locon", True, ["attn"], False, "DoRA (LoCon)"),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data") / "shapes", 6, size=(24, 24))


def config_for(name: str, data_dir, root, **overrides) -> TrainConfig:
    network, dora, targets, text_encoder, _ = CASES[name]
    options = dict(
        data_dir=str(data_dir),
        name=name.replace("_", "-"),
        base="tiny",
        network=network,
        dora=dora,
        rank=4,
        alpha=2.0,  # alpha != rank: the scale matters
        targets=targets,
        train_text_encoder=text_encoder,
        steps=3,
        batch_size=2,
        resolution=16,
        lr=2e-2,
        seed=5,
        output_dir=str(root / name),
        store=str(root / "home"),
        progress=False,
    )
    options.update(overrides)
    return TrainConfig(**options)


@pytest.fixture(scope="module")
def runs(tiny_pipeline, data_dir, tmp_path_factory, one_thread):
    """name -> (result, the trainer's merged weights by module key)."""
    root = tmp_path_factory.mktemp("networks")
    made = {}
    for name in CASES:
        base = base_from(tiny_pipeline)
        targets = lora_targets(base.pipeline)  # the base layers, before PEFT wraps them
        result = train(config_for(name, data_dir, root), base=base)
        layers = [m for m in base.pipeline.unet.modules() if isinstance(m, BaseTunerLayer)]
        layers += [m for m in base.pipeline.text_encoder.modules() if isinstance(m, BaseTunerLayer)]
        with torch.no_grad():
            for layer in layers:
                layer.merge()  # PEFT's own merge (merge_and_unload, layer by layer)
        merged = {key: module.weight.detach().clone() for key, module in targets.items()}
        made[name] = (result, merged)
    return made, root


@pytest.mark.parametrize("name", list(CASES))
def test_served_weights_equal_the_trainers_merge(tiny_pipeline, runs, name):
    made, _ = runs
    result, merged = made[name]
    shapes = module_shapes(tiny_pipeline)
    adapter = load_adapter(result.data, module_names=shapes)
    validate_against_base(adapter, shapes)
    assert adapter.kind == CASES[name][4]
    resolver = MemoryResolver()
    resolver.add_bytes(name, result.data)
    engine = Engine(base_from(tiny_pipeline), resolver=resolver)
    engine.activate([(name, 1.0)])
    served = target_tensors(engine.pipeline)
    base = target_tensors(tiny_pipeline)
    touched = {key for key in merged if not torch.equal(merged[key], base[key])}
    assert touched == set(adapter.modules)  # every trained layer moved, nothing else did
    if CASES[name][3]:
        assert any(key.startswith("text_encoder.") for key in touched)
    worst, where = worst_relative(merged, {key: served[key] for key in merged})
    assert worst < TOLERANCE, (where, worst)


@pytest.mark.parametrize("name", ["loha", "lokr", "dora", "dora_locon"])
def test_lycoris_reads_the_trained_file_as_the_trainer_merged_it(tiny_pipeline, runs, name, tmp_path):
    made, _ = runs
    result, merged = made[name]
    shapes = module_shapes(tiny_pipeline)
    path = tmp_path / f"{name}.safetensors"
    tensors, metadata = read_safetensors(
        to_kohya(load_adapter(result.data, module_names=shapes), module_names=shapes)
    )
    # lycoris-lora names text-encoder modules by its own walk of the model, which has no `text_model.`
    # level on this transformers (A1111's names keep it; loraloom reads both spellings).
    if not any(n.startswith("text_model.") for n, _ in tiny_pipeline.text_encoder.named_modules()):
        tensors = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in tensors.items()}
    save_file(tensors, str(path), metadata)
    lycoris = target_tensors(peer_forward(tiny_pipeline, [(path, 1.0)]))
    worst, where = worst_relative(merged, {key: lycoris[key] for key in merged})
    assert worst < TOLERANCE, (where, worst)


def test_the_store_and_adapters_show_say_what_was_trained(runs):
    made, root = runs
    with AdapterStore.open(home=root / "home") as store:
        for name, (result, _) in made.items():
            version = store.get(result.name)
            meta = version.metadata["file"]
            assert adapter_type(meta) == CASES[name][4], name
            network, dora = CASES[name][:2]
            if network in ("loha", "lokr") or dora:
                assert meta["ss_network_module"] == "lycoris.kohya"
                args = json.loads(meta["ss_network_args"])
                assert args["algo"] == network and (args.get("dora_wd") == "True") == dora
                # What `adapters show` reads without the type the store recorded: the kohya metadata.
                without = {k: v for k, v in meta.items() if k != "loraloom.adapter_type"}
                assert adapter_type(without) == CASES[name][4], name
            else:
                assert meta["ss_network_module"] == "networks.lora"


def test_lokr_of_two_full_matrices_keeps_its_scale(runs):
    """PEFT scales every LoKr by alpha/r; LyCORIS a LoKr of two full matrices by 1: folded into w1."""
    made, _ = runs
    result, _ = made["lokr"]
    modules = result.adapter.modules.values()
    assert any(not m.factored for m in modules) and any(m.factored for m in modules)


@pytest.mark.parametrize("name", ["loha", "lokr", "dora_locon"])
def test_resume_of_each_network_equals_the_uninterrupted_run(data_dir, tmp_path, name, one_thread):
    whole = train(
        config_for(name, data_dir, tmp_path, steps=4, checkpoint_every=2, no_register=True, store="")
    )
    checkpoint = tmp_path / name / "checkpoint-0000002"
    resumed = train(
        config_for(
            name, data_dir, tmp_path / "again", steps=4, resume=str(checkpoint), no_register=True, store=""
        )
    )
    assert resumed.resumed_from == 2
    assert resumed.adapter.modules.keys() == whole.adapter.modules.keys()
    for key, module in whole.adapter.modules.items():
        for mine, theirs in zip(resumed.adapter.modules[key].tensors, module.tensors, strict=True):
            if theirs is not None:
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    if name == "dora_locon":
        assert all(m.dora is not None for m in whole.adapter.modules.values())


def test_resume_refuses_another_network(data_dir, tmp_path, one_thread):
    train(config_for("loha", data_dir, tmp_path, steps=2, checkpoint_every=2, no_register=True, store=""))
    other = config_for("lokr", data_dir, tmp_path, output_dir=str(tmp_path / "loha"), steps=2)
    other.resume, other.no_register, other.store = "latest", True, ""
    with pytest.raises(FailedPrecondition, match=r"network: 'loha' then, 'lokr' now"):
        train(other)


def test_dora_on_loha_or_lokr_and_unknown_networks_are_refused(tmp_path):
    for network in ("loha", "lokr"):
        with pytest.raises(
            InvalidArgument, match=f"dora is trained on lora or locon networks, not {network}"
        ):
            TrainConfig(data_dir="x", network=network, dora=True).check()
    with pytest.raises(InvalidArgument, match="network must be one of lora, locon, loha, lokr"):
        TrainConfig(data_dir="x", network="oft").check()
    from server.cli.main import app

    result = CliRunner().invoke(app, ["train", str(tmp_path), "--network", "loha", "--dora", "--no-register"])
    assert result.exit_code == 2 and "dora is trained on lora or locon" in result.output


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["loha", "lokr", "dora_locon"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_each_network_trains_under_autocast_on_cuda(data_dir, tmp_path, name, precision):
    config = config_for(
        name, data_dir, tmp_path, device="cuda", mixed_precision=precision, no_register=True, store=""
    )
    result = train(config)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    deltas = [module.delta() for module in result.adapter.modules.values()]
    assert all(torch.isfinite(d).all() for d in deltas) and any(torch.count_nonzero(d) for d in deltas)
