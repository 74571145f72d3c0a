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
from server.backends.onnx_export import example_inputs
from server.backends.openvino_backend import FULL, OvUnet, slot_bytes
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


def _a_plan(pipeline, name: str = "a"):
    fused = FusedWeights(lora_targets(pipeline))
    adapter = unet_adapters(pipeline)[name]
    return fused.plan([(fused.prepare(adapter, name=name, version=1, sha256=name * 8), 1.0)])


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
        # A slot owns the buffers of all but the spatial convolutions and biases (W0 read in place).
        buffers = [slot.buffer(key) for slot in slots for key in slot.keys if slot.own(key)]
        assert {key for key in slots[0].keys if not slots[0].own(key)} == unet._lean_constants
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


def test_a_slot_holds_a_convolution_only_while_its_blend_changes_it(own_tiny):
    """Spatial convolutions and biases read W0 in place until a LoCon blend touches them: then the
    slot allocates those it changes (and rebinds its full variant's requests), and drops them again
    for a blend that does not; the images stay exact."""
    fingerprint = base_from(own_tiny).fingerprint
    plan = _a_plan(own_tiny, "b")  # touches 3x3 convolutions
    unet = OvUnet(own_tiny, fingerprint, precision="bf16", threads=1, slots=1)
    fresh = OvUnet(own_tiny, fingerprint, precision="bf16", threads=1, slots=1)
    sample, timestep, hidden = example_inputs(own_tiny.unet, batch=1)

    def run(backend: OvUnet) -> torch.Tensor:
        return backend(sample, timestep, encoder_hidden_states=hidden)[0]

    eager = unet.memory_bytes()["slots"]
    assert eager == slot_bytes(own_tiny, "bf16")
    unet.variant = FULL
    full_base = run(unet)  # the full variant's request, bound to W0
    unet.apply(plan)
    changed = {key for key in plan.updates if key in unet._lean_constants}
    assert changed and unet.variant == FULL
    assert {key for key in unet.weight_keys if unet.weights.own(key)} >= changed
    held = sum(unet.buffer(key).numel() * unet.buffer(key).element_size() for key in changed)
    assert unet.memory_bytes()["slots"] == eager and unet.memory_bytes()["locon"] == held
    fresh.apply(plan)
    out = run(unet)
    assert torch.equal(out, run(fresh))  # the request bound before the swap reads the new buffers
    unet.apply(None)
    assert unet.memory_bytes()["slots"] == eager and unet.memory_bytes()["locon"] == 0
    assert all(unet.buffer(key) is unet.weights.pristine[key] for key in changed)
    unet.variant = FULL
    assert torch.equal(run(unet), full_base)  # rebound to W0: the base, bit for bit
    unet.apply(plan)
    assert torch.equal(run(unet), out)  # B -> base -> B
