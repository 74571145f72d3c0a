"""LyCORIS files on the OpenVINO backend (fp32): the weight buffers the runtime reads equal the
lycoris-lora package's own merge, module by module, biases of full diffs included; and the
images equal the torch engine's.

The same files and references as ``tests/adapters/test_lycoris.py`` (which explains why LoHa
and low-rank LoKr are compared with the package's module forward rather than its merge).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.engine import Engine, MemoryResolver
from server.engine.types import GenerateRequest
from tests.adapters.lycoris_files import peer_forward, peer_merge, target_tensors, worst_relative
from tests.adapters.lycoris_files import write_lycoris as write
from tests.engine.conftest import base_from, engine_on

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("in_ov_home")]

WEIGHT = 0.8
TOLERANCE = 2e-6  # relative to each tensor's largest value (float32 rounding)
PIXEL_TOLERANCE = 2  # of 255: the fp32 backend against torch (tests/backends/test_openvino_backend.py)
CASES = {
    "locon-full": ("locon", "full", {}),
    "tucker-full": ("locon", "full", {"use_tucker": True}),
    "loha-attention": ("loha", "attention", {}),
    "loha-full": ("loha", "full", {"use_tucker": True}),
    "lokr-full": ("lokr", "full", {}),
    "dora-attention": ("locon", "attention", {"weight_decompose": True}),
    "dora-full": ("locon", "full", {"weight_decompose": True}),
    "dora-lokr": ("lokr", "attention", {"weight_decompose": True}),
    "diff-attention": ("full", "attention", {}),
    "diff-full": ("full", "full", {}),
}
# Where lycoris-lora's merge applies alpha/dim twice (its forward, A1111, ComfyUI and loraloom once).
FORWARD_REFERENCE = {"loha-attention", "loha-full", "lokr-full"}


@pytest.fixture(scope="module")
def files(tiny_pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lycoris")
    return {
        name: write(tiny_pipeline, folder / f"{name}.safetensors", algo, preset, **options)
        for name, (algo, preset, options) in CASES.items()
    }


def _engine(pipeline, files, backend: str) -> Engine:
    resolver = MemoryResolver()
    for name, path in files.items():
        resolver.add_file(name, path)
    return engine_on(base_from(pipeline), backend, "fp32", resolver=resolver)


@pytest.fixture(scope="module")
def ov_engine(tiny_pipeline, files, ov_home):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORALOOM_HOME", str(ov_home))
        return _engine(tiny_pipeline, files, "openvino")


def _buffers(engine: Engine) -> dict[str, torch.Tensor]:
    """What the OpenVINO runtime reads: the UNet's and the text encoder's weight (and bias) buffers."""
    backend = engine._backend
    buffers = {key: backend.unet.buffer(key).clone() for key in backend.unet.weight_keys}
    text = backend.text_encoder
    buffers.update({key: text.weights.buffer(key).clone() for key in text.weight_keys})
    return buffers


@pytest.mark.parametrize("name", list(CASES))
def test_openvino_buffers_equal_the_peers_merge(tiny_pipeline, files, ov_engine, name):
    ov_engine.activate([(name, WEIGHT)])
    buffers = _buffers(ov_engine)
    reference = peer_forward if name in FORWARD_REFERENCE else peer_merge
    expected = target_tensors(reference(tiny_pipeline, [(files[name], WEIGHT)]))
    assert set(buffers) == set(expected)  # every target weight and bias is an input
    worst, where = worst_relative(expected, buffers)
    assert worst < TOLERANCE, (where, worst)
    base = target_tensors(tiny_pipeline)
    if name.startswith("diff"):  # its bias differences reached the runtime's buffers
        assert any(key.endswith(".bias") and not torch.equal(buffers[key], base[key]) for key in buffers)


def test_openvino_draws_the_torch_engines_images_and_swaps_back_exactly(tiny_pipeline, files, ov_engine):
    reference = _engine(tiny_pipeline, files, "torch")
    blends = ([("diff-full", 0.5), ("dora-full", 0.7)], [("loha-full", 0.8), ("lokr-full", -0.5)], [])
    images = {}
    for blend in (*blends, blends[0]):
        request = GenerateRequest(prompt="a red square", steps=3, seed=5, adapters=list(blend))
        got = np.asarray(ov_engine.generate(request).images[0], dtype=np.int16)
        expected = np.asarray(reference.generate(request).images[0], dtype=np.int16)
        assert np.abs(got - expected).max() <= PIXEL_TOLERANCE, blend
        images.setdefault(tuple(blend), []).append(got)
    first, again = images[tuple(blends[0])]
    assert np.array_equal(first, again)  # A -> B -> base -> A: nothing of B leaked
    assert np.abs(first - images[()][0]).max() > 10 * PIXEL_TOLERANCE
    ov_engine.activate([])
    base = target_tensors(tiny_pipeline)
    assert all(torch.equal(value, base[key]) for key, value in _buffers(ov_engine).items())
