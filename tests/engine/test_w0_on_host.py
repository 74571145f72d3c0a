"""``w0_on_host``: W0 kept in host memory, blends written into the parameters in place (#22).

On a GPU this keeps one copy of each weight in VRAM (W0 pinned on the host, as A1111 and
ComfyUI keep their backups). On the CPU it runs the same code path, so these tests check
its arithmetic and bookkeeping here; the VRAM figures come from ``scripts/gpu_check.py``.
"""

from __future__ import annotations

import pytest
import torch

from server.engine import GenerateRequest
from tests.engine.conftest import make_engine

X = [("ink", 0.7), ("clay", 0.3)]
Y = [("neon", 1.0), ("moss", -0.5)]  # LoCon members: convolutions too


def weights_of(engine) -> dict[str, torch.Tensor]:
    return {key: param.detach().clone() for key, param in engine._fused._params.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_blends_written_in_place_equal_the_repointed_ones_bit_for_bit(micro_pipeline, micro_adapters):
    host = make_engine(micro_pipeline, "micro", micro_adapters, w0_on_host=True)
    fused = make_engine(micro_pipeline, "micro", micro_adapters)
    pointers = {key: param.data_ptr() for key, param in host._fused._params.items()}
    base = weights_of(host)
    for blend in (X, Y, X, [], Y, X):
        host.activate(blend)
        fused.activate(blend)
        assert same(weights_of(host), weights_of(fused))
        # in place: every parameter keeps its own storage
        assert {key: param.data_ptr() for key, param in host._fused._params.items()} == pointers
    host.activate([])
    assert same(weights_of(host), base)
    stats = host.stats()
    assert stats.scratch_bytes == 0 and host._fused.host_bytes > 0
    assert all(plan.weights is None for _, plan, *_ in host._plans.items())  # nothing materialized


def test_a_cached_blend_is_not_rewritten_and_images_match(micro_pipeline, micro_adapters):
    host = make_engine(micro_pipeline, "micro", micro_adapters, w0_on_host=True)
    fused = make_engine(micro_pipeline, "micro", micro_adapters)
    host.activate(X)
    host.activate(X)
    assert host._fused.written > 0  # the first write stands (the second call returned early)
    host.activate(Y)
    host.activate(X)
    assert host._fused.written == len(host._plans.peek(host.resolve_blend(X).signature).updates)
    request = GenerateRequest("a fox", steps=2, seed=5, adapters=Y)
    assert host.generate(request).images[0].tobytes() == fused.generate(request).images[0].tobytes()


def test_the_warm_up_leaves_the_base_in_place(micro_pipeline, micro_adapters):
    host = make_engine(micro_pipeline, "micro", micro_adapters, w0_on_host=True)
    base = weights_of(host)
    host.warm_up()
    assert same(weights_of(host), base)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_w0_is_pinned_and_vram_holds_one_copy(micro_pipeline, micro_adapters):
    from tests.engine.conftest import base_from

    def engine_on_gpu(**kwargs):
        from server.engine import Engine, MemoryResolver

        base = base_from(micro_pipeline, "micro", device="cuda")
        base.pipeline.to("cuda")
        resolver = MemoryResolver()
        for name, adapter in micro_adapters.items():
            resolver.add_adapter(name, adapter)
        return Engine(base, resolver=resolver, **kwargs)

    host = engine_on_gpu(w0_on_host=True)
    assert all(t.is_pinned() for t in host._fused._pristine.values())
    before = torch.cuda.memory_allocated()
    host.activate(X)
    host.activate(Y)
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    assert grown < host._fused.materialized_bytes(host._plans.peek(host.resolve_blend(Y).signature))
