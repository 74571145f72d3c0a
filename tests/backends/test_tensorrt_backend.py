"""TensorRT backend: everything before the TensorRT calls, on CPU; the engine itself on a GPU."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch

from adapters.errors import FailedPrecondition
from server.backends.onnx_export import ExportSettings, export_unet, unet_targets
from server.backends.tensorrt_backend import (
    BuildSettings,
    keys_to_refit,
    plan_cache_key,
    refit_arrays,
    refit_name_map,
    require_tensorrt,
)
from server.engine.fuse import FusedWeights
from server.models.factory import build_pipeline
from server.models.shapes import lora_targets

from .conftest import unet_adapters


@pytest.mark.parametrize("model", ["tiny", "small"])
def test_refit_name_map_covers_every_unet_target(model, tiny_pipeline, export_folder):
    pipeline = tiny_pipeline if model == "tiny" else build_pipeline("small", seed=0)
    exported = export_unet(
        pipeline, f"{model}-fp", ExportSettings(weights="initializers"), folder=export_folder
    )
    mapping = refit_name_map(exported.path, pipeline)
    targets = unet_targets(pipeline)
    assert len(targets) > 50
    assert sorted(mapping.values()) == sorted(targets)  # 100 % of the adapter-targetable UNet weights
    assert all(name == f"{key}.weight" for name, key in mapping.items())


def test_plan_cache_key_changes_with_every_input():
    export, build = ExportSettings(weights="initializers"), BuildSettings()
    base = plan_cache_key("fp", export, build, "10.3.0", "NVIDIA H200")
    assert base == plan_cache_key("fp", export, build, "10.3.0", "NVIDIA H200")
    others = [
        plan_cache_key("fp2", export, build, "10.3.0", "NVIDIA H200"),
        plan_cache_key(
            "fp", ExportSettings(weights="initializers", opset=18), build, "10.3.0", "NVIDIA H200"
        ),
        plan_cache_key("fp", export, BuildSettings(fp16=False), "10.3.0", "NVIDIA H200"),
        plan_cache_key("fp", export, BuildSettings(max_batch=16), "10.3.0", "NVIDIA H200"),
        plan_cache_key("fp", export, build, "10.4.0", "NVIDIA H200"),
        plan_cache_key("fp", export, build, "10.3.0", "NVIDIA L4"),
    ]
    assert len({base, *others}) == 1 + len(others)


def test_refit_arrays_come_from_base_and_never_leak(tiny_pipeline):
    own = copy.deepcopy(tiny_pipeline)
    fused = FusedWeights(lora_targets(own))
    adapters = unet_adapters(own)
    a = fused.prepare(adapters["a"], name="a", version=1, sha256="a" * 8)
    b = fused.prepare(adapters["b"], name="b", version=1, sha256="b" * 8)
    plan_a, plan_b = fused.plan([(a, 1.0)]), fused.plan([(b, 0.5)])
    pristine = {key: module.weight.detach().clone() for key, module in unet_targets(own).items()}

    keys_a = keys_to_refit((), plan_a, pristine)
    assert keys_a == sorted(plan_a.updates)
    arrays_a = refit_arrays(pristine, plan_a, keys_a)
    # The same weights the torch fused path computes for A.
    fused.apply(plan_a)
    targets = unet_targets(own)
    for key, array in arrays_a.items():
        assert array.dtype == np.float32 and array.shape == tuple(pristine[key].shape)
        np.testing.assert_allclose(array, targets[key].weight.detach().numpy(), rtol=0, atol=1e-6)

    # A -> B: B's keys plus every key A touched that B does not (set back to base).
    keys_b = keys_to_refit(keys_a, plan_b, pristine)
    assert set(keys_b) == set(keys_a) | set(plan_b.updates)
    arrays_b = refit_arrays(pristine, plan_b, keys_b)
    for key in set(keys_a) - set(plan_b.updates):
        assert np.array_equal(arrays_b[key], pristine[key].numpy())
    # B -> A again: bit for bit the first A (computed from base, not from B).
    again = refit_arrays(pristine, plan_a, keys_to_refit(plan_b.updates, plan_a, pristine))
    for key in keys_a:
        assert np.array_equal(again[key], arrays_a[key])
    # -> base: everything touched comes back bit for bit.
    back = refit_arrays(pristine, None, keys_to_refit(keys_a, None, pristine))
    assert set(back) == set(keys_a)
    for key, array in back.items():
        assert np.array_equal(array, pristine[key].numpy())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_clear_error_without_cuda_or_tensorrt():
    with pytest.raises(FailedPrecondition, match="CUDA device.*loraloom\\[tensorrt\\]"):
        require_tensorrt()


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs tensorrt")
def test_tensorrt_matches_torch_and_refit_leaks_nothing(tiny_pipeline, tmp_path):
    from server.backends.onnx_export import example_inputs
    from server.backends.tensorrt_backend import TensorRTUnet

    own = copy.deepcopy(tiny_pipeline)
    fused = FusedWeights(lora_targets(own))
    adapters = unet_adapters(own)
    a = fused.prepare(adapters["a"], name="a", version=1, sha256="a" * 8)
    b = fused.prepare(adapters["b"], name="b", version=1, sha256="b" * 8)
    plan_a, plan_b = fused.plan([(a, 1.0)]), fused.plan([(b, 0.5)])
    trt_unet = TensorRTUnet(own, "tiny-fp", BuildSettings(fp16=False), folder=tmp_path)
    sample, timestep, hidden = example_inputs(own.unet, batch=2)

    def torch_out():
        with torch.no_grad():
            return own.unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]

    fused.apply(plan_a)
    trt_unet.apply(plan_a)
    first_a = trt_unet(sample, timestep, encoder_hidden_states=hidden)[0].cpu()
    assert (first_a - torch_out()).abs().max() < 1e-2
    trt_unet.apply(plan_b)
    trt_unet.apply(plan_a)
    assert (trt_unet(sample, timestep, encoder_hidden_states=hidden)[0].cpu() - first_a).abs().max() < 1e-5
