"""The GenAI exporter: loraloom's tiny model loads in OpenVINO GenAI and draws loraloom's image.

GenAI in f32 with torch's noise (``TorchGenerator``) and the same Euler schedule gives
the torch engine's image within 2 levels, with and without a kohya adapter, and the
adapter visibly changes it: the bench's comparison runs the same model and blend on both sides.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino_genai")

from adapters.formats import to_kohya
from bench.genai.export import export_for_genai
from bench.genai.peer import GenaiPeer, Settings
from server.engine import Engine, GenerateRequest, MemoryResolver
from server.engine.synthetic import random_adapter
from server.models.loader import load_base_model

SETTINGS = Settings("a red square on a blue field", size=64, steps=4, guidance_scale=7.5, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _max_diff(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.abs(first.astype(np.float32) - second.astype(np.float32)).max())


def test_tiny_export_draws_loraloom_image_in_genai_and_a_kohya_adapter_changes_it(loraloom_home, tmp_path):
    base = load_base_model("tiny")
    exported = export_for_genai(base)
    assert not exported.cached
    assert exported.path.is_relative_to(loraloom_home)
    assert export_for_genai(base) == type(exported)(exported.path, cached=True)

    adapter = random_adapter(base.module_shapes, seed=3, rank=8, strength=0.1)
    path = tmp_path / "a.safetensors"
    path.write_bytes(to_kohya(adapter))
    peer = GenaiPeer(exported.path, {"a": path}, threads=1, precision="f32")
    theirs_base = peer.generate(SETTINGS)
    theirs_lora = peer.generate(SETTINGS, [("a", 1.0)])
    assert theirs_base.shape == (64, 64, 3) and theirs_base.dtype == np.uint8

    resolver = MemoryResolver()
    resolver.add_file("a", path)
    engine = Engine(base, resolver=resolver)

    def ours(blend):
        request = GenerateRequest(
            SETTINGS.prompt,
            steps=SETTINGS.steps,
            seed=SETTINGS.seed,
            guidance_scale=SETTINGS.guidance_scale,
            sampler="euler",
            adapters=blend,
        )
        return np.asarray(engine.generate(request).images[0])

    assert _max_diff(theirs_base, ours([])) <= 2
    assert _max_diff(theirs_lora, ours([("a", 1.0)])) <= 2
    assert _max_diff(theirs_lora, theirs_base) > 5
