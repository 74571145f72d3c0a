"""End to end on the tiny model: loss goes down, the adapter changes images, resume equals no stop.

One 100-step run (module fixture) is shared; the resume test reruns the same
config interrupted by a real SIGINT at step 50 and resumed from the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from imagegen import make_folder

from adapters.formats import load_adapter
from adapters.store import AdapterStore
from server.models.factory import build_pipeline
from server.models.shapes import lora_targets, module_shapes
from trainer import TrainConfig, TrainingInterrupted, train

pytestmark = pytest.mark.slow

STEPS = 100


def make_config(data_dir, output_dir, **overrides) -> TrainConfig:
    options = dict(
        data_dir=str(data_dir),
        name="shapes",
        base="tiny",
        steps=STEPS,
        batch_size=2,
        resolution=16,
        lr=1e-2,
        lr_scheduler="cosine",
        warmup_steps=10,
        targets=["attn", "conv"],
        seed=3,
        trigger_word="shp",
        output_dir=str(output_dir),
        progress=False,
    )
    options.update(overrides)
    return TrainConfig(**options)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data") / "shapes", 16, size=(40, 40))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset_dir, one_thread):
    root = tmp_path_factory.mktemp("run")
    config = make_config(
        dataset_dir,
        root / "out",
        checkpoint_every=25,
        keep_checkpoints=2,
        validation_prompts=["red circle"],
        sample_steps=[50],
        sample_inference_steps=2,
        store=str(root / "home"),
        tags=["test"],
        description="shapes on the tiny model",
    )
    return config, train(config), root


def test_loss_goes_down(trained):
    _, result, _ = trained
    assert result.steps == STEPS and len(result.losses) == STEPS
    first, last = result.mean_loss(first=20), result.mean_loss(last=20)
    assert last < 0.8 * first, (first, last)


def test_registered_into_the_store_with_kohya_metadata(trained):
    _, result, root = trained
    assert result.registration is not None and result.registration.ref == "shapes@1"
    with AdapterStore.open(home=root / "home") as store:
        version = store.get("shapes")
        with store.open_blob(version) as blob:
            data = blob.read()
    assert data == result.data and version.sha256 == result.sha256
    assert version.trigger_words == ("shp",) and version.tags == ("test",)
    assert version.base_architecture == "loraloom:tiny"
    assert version.metadata["training"]["steps"] == STEPS
    meta = version.metadata["file"]
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8"
    assert meta["ss_steps"] == str(STEPS) and float(meta["ss_learning_rate"]) == 1e-2
    assert meta["ss_new_sd_model_hash"] == version.base_fingerprint and len(version.base_fingerprint) == 64
    assert json.loads(meta["ss_tag_frequency"])["shapes"]["shape"] == 16
    assert json.loads(meta["ss_dataset_dirs"])["shapes"]["img_count"] == 16
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "8"
    assert result.path.read_bytes() == data


def test_adapter_changes_the_generated_image(trained):
    _, result, _ = trained
    pipeline = build_pipeline("tiny", seed=0)
    adapter = load_adapter(result.data, module_names=module_shapes(pipeline).keys())
    assert any(m.is_conv and m.down.shape[-1] == 3 for m in adapter.modules.values())

    def generate() -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        image = pipeline("red circle", num_inference_steps=4, generator=generator, output_type="np").images[0]
        return np.asarray(image)

    before = generate()
    targets = lora_targets(pipeline)
    with torch.no_grad():
        for key, module in adapter.modules.items():
            targets[key].weight += module.delta()
    after = generate()
    assert np.abs(after - before).mean() > 0.01


def test_checkpoints_and_samples(trained):
    _, result, root = trained
    kept = sorted(p.name for p in (root / "out").glob("checkpoint-*"))
    assert kept == ["checkpoint-0000075", "checkpoint-0000100"]
    assert [p.name for p in result.checkpoints][-1] == "checkpoint-0000100"
    names = sorted(p.name for p in result.samples)
    assert names == ["step-0000050-0-red-circle.png", "step-0000100-0-red-circle.png"]
    assert all(p.stat().st_size > 0 for p in result.samples)


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(trained, dataset_dir, tmp_path, one_thread):
    _, reference, _ = trained
    config = make_config(dataset_dir, tmp_path / "out", no_register=True)

    def press_ctrl_c(info) -> None:
        if info.step == 50:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="stopped at step 50") as stopped:
        train(config, on_step=press_ctrl_c)
    assert stopped.value.checkpoint.name == "checkpoint-0000050"
    assert not (tmp_path / "out" / "shapes.safetensors").exists()

    config.resume = "latest"
    resumed = train(config)
    assert resumed.resumed_from == 50 and resumed.steps == STEPS
    # Same machine, same kernels: the runs agree to float32 rounding (stated tolerance 1e-5).
    np.testing.assert_allclose(resumed.losses, reference.losses, rtol=1e-5, atol=1e-6)
    assert resumed.adapter.modules.keys() == reference.adapter.modules.keys()
    for key, module in reference.adapter.modules.items():
        other = resumed.adapter.modules[key]
        torch.testing.assert_close(other.down, module.down, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.up, module.up, rtol=1e-5, atol=1e-6)


def test_resume_refuses_changed_options(trained, dataset_dir, one_thread):
    _, _, root = trained
    changed = make_config(dataset_dir, root / "out", rank=4, resume="latest", no_register=True)
    from adapters.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match=r"options changed \(rank: 8 then, 4 now\)"):
        train(changed)
