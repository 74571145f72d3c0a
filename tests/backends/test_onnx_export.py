"""ONNX export: every UNet LoRA target is a named weight of the right shape; ORT equals torch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from server.backends.onnx_export import (
    ExportSettings,
    example_inputs,
    export_key,
    export_unet,
    initializer_key_map,
    target_tensors,
    unet_targets,
)
from server.models.shapes import module_shapes

TOLERANCE = 1e-4  # absolute, on UNet outputs of magnitude ~1 (float32 kernel order differs)


def _graph_inputs(path) -> dict[str, tuple]:
    model = onnx.load(str(path))
    return {
        i.name: tuple(
            d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim
        )
        for i in model.graph.input
    }


def test_weights_as_inputs_cover_every_unet_target(micro_pipeline, export_folder):
    exported = export_unet(micro_pipeline, "micro-fp", folder=export_folder)
    shapes = {k: v for k, v in module_shapes(micro_pipeline).items() if k.startswith("unet.")}
    inputs = _graph_inputs(exported.path)
    assert set(exported.weight_keys) == set(shapes) and shapes
    for key, shape in shapes.items():
        assert inputs[key] == shape, key
    # Each target's bias is an input too (full-weight diffs may change it): ``<key>.bias``.
    targets = unet_targets(micro_pipeline)
    biased = {f"{key}.bias": m.bias for key, m in targets.items() if m.bias is not None}
    assert set(exported.bias_keys) == set(biased) and biased
    for key, bias in biased.items():
        assert inputs[key] == tuple(bias.shape), key
    assert inputs["sample"][0] == "batch"


def test_initializers_named_by_canonical_key(micro_pipeline, export_folder):
    exported = export_unet(
        micro_pipeline, "micro-fp", ExportSettings(weights="initializers"), folder=export_folder
    )
    mapping = initializer_key_map(exported.path, exported.weight_keys)
    assert sorted(mapping.values()) == sorted(unet_targets(micro_pipeline))
    model = onnx.load(str(exported.path))
    dims = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for name, key in mapping.items():
        assert dims[name] == tuple(unet_targets(micro_pipeline)[key].weight.shape)


def test_export_is_cached_by_fingerprint_and_settings(micro_pipeline, export_folder):
    first = export_unet(micro_pipeline, "micro-fp", folder=export_folder)
    again = export_unet(micro_pipeline, "micro-fp", folder=export_folder)
    assert again.cached and again.path == first.path
    assert export_key("micro-fp", ExportSettings()) != export_key("other", ExportSettings())
    assert export_key("micro-fp", ExportSettings()) != export_key(
        "micro-fp", ExportSettings(weights="initializers")
    )
    assert not [p for p in export_folder.iterdir() if p.name.startswith(".export-")]


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_equals_torch(tiny_pipeline, export_folder, batch):
    exported = export_unet(tiny_pipeline, "tiny-fp", folder=export_folder)
    unet = tiny_pipeline.unet
    sample, timestep, hidden = example_inputs(unet, batch=batch)
    with torch.no_grad():
        expected = unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0].numpy()
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    feed = {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": hidden.numpy()}
    feed |= {key: tensor.numpy() for key, tensor in target_tensors(unet_targets(tiny_pipeline)).items()}
    got = session.run(None, feed)[0]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < TOLERANCE
