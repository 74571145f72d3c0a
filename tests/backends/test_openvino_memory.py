"""What the OpenVINO backend holds: W0 in the runtime's precision, the replaced torch weights freed,
its own account of its bytes true to the tensors it allocated; swaps still exact."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from adapters.errors import InvalidArgument
from server.backends.openvino_backend import OvUnet, slot_bytes
from server.backends.openvino_runtime import cpu_supports_bf16
from server.backends.select import build_backend
from server.engine import MemoryResolver
from server.engine.fuse import FusedWeights
from server.engine.types import GenerateRequest
from server.models.shapes import lora_targets
from tests.engine.conftest import base_from, engine_on

from .conftest import unet_adapters

pytestmark = [
    pytest.mark.usefixtures("in_ov_home"),
    pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native BF16"),
]


def _storage_bytes(tensors) -> int:
    """The bytes of the distinct storages under ``tensors`` (what is really allocated)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _a_plan(pipeline):
    fused = FusedWeights(lora_targets(pipeline))
    adapter = unet_adapters(pipeline)["a"]
    return fused.plan([(fused.prepare(adapter, name="a", version=1, sha256="a" * 8), 1.0)])


def test_the_account_matches_the_tensors_and_bf16_halves_w0(own_tiny):
    fingerprint = base_from(own_tiny).fingerprint
    units = {p: OvUnet(own_tiny, fingerprint, precision=p, threads=1, slots=2) for p in ("fp32", "bf16")}
    plan = _a_plan(own_tiny)
    for unet in units.values():
        unet.apply(plan)  # the second slot is made
    held = {p: unet.memory_bytes() for p, unet in units.items()}
    for precision, unet in units.items():
        slots = unet._slots
        assert len(slots) == 2
        assert held[precision]["pristine"] == _storage_bytes(unet.weights.pristine.values())
        buffers = [slot.buffer(key) for slot in slots for key in slot.keys]
        assert held[precision]["slots"] == _storage_bytes(buffers) == 2 * slot_bytes(own_tiny, precision)
    weights = [key for key in units["fp32"].weight_keys if not key.endswith(".bias")]
    biases = held["fp32"]["pristine"] - _storage_bytes(units["fp32"].weights.pristine[k] for k in weights)
    # bf16: the weights' W0 is half of float32's; the biases stay float32.
    assert held["bf16"]["pristine"] - biases == (held["fp32"]["pristine"] - biases) // 2
    assert held["fp32"]["scratch"] == 0 and held["bf16"]["scratch"] > 0
    # fp32: W0 is the torch modules' own weights; bf16 (built directly): a copy, until shared.
    assert held["fp32"]["torch"] == 0
    assert held["bf16"]["torch"] == 2 * (held["bf16"]["pristine"] - biases)
    assert units["bf16"].share_pristine() == held["bf16"]["torch"]
    assert units["bf16"].memory_bytes()["torch"] == 0
    assert units["bf16"].share_pristine() == 0  # once


def test_the_backend_frees_the_torch_weights_it_replaces_and_swaps_exactly(tiny_pipeline):
    base = base_from(tiny_pipeline)
    targets = lora_targets(base.pipeline)
    replaced = {key: weakref.ref(module.weight) for key, module in targets.items()}
    resolver = MemoryResolver()
    for name, adapter in unet_adapters(tiny_pipeline).items():
        resolver.add_adapter(name, adapter)
    engine = engine_on(base, "openvino", "bf16", resolver=resolver)
    gc.collect()
    assert not any(ref() is not None for ref in replaced.values())  # the float32 weights are gone
    backend = engine._backend
    for part in (backend.unet, backend.text_encoder):
        for key in part.weight_keys:
            if not key.endswith(".bias"):  # the module's weight is the backend's bf16 W0
                assert targets[key].weight.data_ptr() == part.weights.pristine[key].data_ptr()
                assert targets[key].weight.dtype == torch.bfloat16
    held = backend.memory_bytes()
    assert (
        set(held) == {"unet", "text_encoder"} and held["unet"]["torch"] == held["text_encoder"]["torch"] == 0
    )
    base_buffers = {key: backend.unet.buffer(key).clone() for key in backend.unet.weight_keys}

    def image(blend):
        request = GenerateRequest(prompt="a red square", steps=3, seed=5, adapters=list(blend))
        return np.asarray(engine.generate(request).images[0], dtype=np.int16)

    first = image([("a", 1.0)])
    image([("b", 0.8)])
    image([])
    assert all(torch.equal(backend.unet.buffer(key), value) for key, value in base_buffers.items())
    assert np.array_equal(image([("a", 1.0)]), first)  # A -> B -> base -> A: bit for bit
    # Its float32 weights are gone: another backend on this base is refused, not silently bf16.
    for name, precision in (("torch", "fp32"), ("openvino", "fp32"), ("onnxruntime", "fp32")):
        with pytest.raises(InvalidArgument, match="handed to backend openvino"):
            build_backend(name, base, precision)
