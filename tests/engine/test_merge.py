"""TIES and DARE blends, served: the engine writes exactly PEFT's merge of the adapters' deltas."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from adapters.blend import Merge
from adapters.errors import InvalidArgument
from server.engine import GenerateRequest
from server.models.shapes import lora_targets

BLEND = [("ink", 0.8), ("neon", 0.6), ("clay", -0.4)]


def _expected(engine, adapters, pristine, merge: Merge) -> dict[str, torch.Tensor]:
    """W0 + PEFT's merge of the per-adapter deltas, adapters in the blend's signature order."""
    resolved = engine.resolve_blend(BLEND, merge)
    order = [(adapters[r.name], w) for r, w in sorted(resolved.entries, key=lambda e: (e[0].sha256, e[1]))]
    weights = torch.tensor([w for _, w in order])
    keys = sorted({key for adapter, _ in order for key in adapter.modules})
    if merge.method.startswith("dare"):
        torch.manual_seed(merge.seed)  # PEFT draws from the global generator, module by module
    expected = {}
    for key in keys:
        shape = pristine[key].shape
        tasks = [
            a.modules[key].delta().reshape(shape) if key in a.modules else torch.zeros(shape)
            for a, _ in order
        ]
        if merge.method == "ties":
            delta = merge_utils.ties(tasks, weights, merge.density, "total")
        elif merge.method == "dare_ties":
            delta = merge_utils.dare_ties(tasks, weights, merge.density, "total")
        else:
            delta = merge_utils.dare_linear(tasks, weights, merge.density)
        expected[key] = pristine[key] + delta
    return expected


@pytest.mark.parametrize(
    "merge", [Merge("ties", 0.3), Merge("dare_linear", 0.6, seed=3), Merge("dare_ties", 0.5, seed=1)]
)
def test_merged_blend_weights_are_peft_merges(micro_engine, micro_adapters, merge):
    targets = lora_targets(micro_engine.pipeline)
    pristine = {key: module.weight.detach().clone() for key, module in targets.items()}
    expected = _expected(micro_engine, micro_adapters, pristine, merge)
    result = micro_engine.generate(GenerateRequest("a fox", steps=1, seed=1, adapters=BLEND, merge=merge))
    assert result.parameters.merge == merge
    for key, weight in expected.items():
        torch.testing.assert_close(targets[key].weight, weight, rtol=1e-5, atol=1e-6)
    micro_engine.activate([])  # back to the base, bit for bit
    assert all(torch.equal(targets[key].weight, pristine[key]) for key in targets)


def test_the_merge_is_part_of_the_blend_identity(micro_engine):
    linear = micro_engine.generate(GenerateRequest("a fox", steps=1, seed=1, adapters=BLEND))
    ties = micro_engine.generate(
        GenerateRequest("a fox", steps=1, seed=1, adapters=BLEND, merge=Merge("ties"))
    )
    again = micro_engine.generate(
        GenerateRequest("a fox", steps=1, seed=1, adapters=BLEND, merge=Merge("ties"))
    )
    assert linear.blend_signature != ties.blend_signature == again.blend_signature
    assert ties.images[0].tobytes() == again.images[0].tobytes()


def test_merge_settings_from_the_wire():
    assert Merge.asked("", 0.7).is_linear and Merge.asked("linear", 0.0, 5) == Merge()
    assert Merge.asked("ties", 0.0, 9) == Merge("ties", 0.5, 0)  # density 0 -> 0.5; ties has no seed
    assert Merge.asked("dare_linear", 0.25, 9) == Merge("dare_linear", 0.25, 9)
    for method, density in (("magic", 0.5), ("ties", 1.5), ("ties", -0.1), ("ties", float("nan"))):
        with pytest.raises(InvalidArgument):
            Merge.asked(method, density)
