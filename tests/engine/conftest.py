"""Engine fixtures: private copies of the micro/tiny models, and real adapters for them."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters.canonical import LoraAdapter
from server.backends.select import build_backend
from server.engine import Engine, MemoryResolver
from server.engine.synthetic import random_adapter
from server.models.families import family_of
from server.models.loader import BaseModel, infer_architecture
from server.models.shapes import module_shapes

ADAPTER_NAMES = ("ink", "neon", "clay", "moss", "rust")


def base_from(
    pipeline, name: str = "tiny", *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> BaseModel:
    """A private, mutable copy of a session pipeline wrapped as the loader's BaseModel.

    ``dtype`` and ``device`` are only what the BaseModel says (the weights stay as they are),
    which is how tests reach the engine's refusals of unsupported settings.
    """
    own = copy.deepcopy(pipeline)
    for component in family_of(own).weight_components:
        getattr(own, component).requires_grad_(False).eval()
    return BaseModel(
        pipeline=own,
        source=name,
        name=name,
        architecture=infer_architecture(own),
        resolution=own.unet.config.sample_size * own.vae_scale_factor,
        device=torch.device(device),
        dtype=dtype,
    )


def engine_on(base: BaseModel, backend: str, precision: str = "fp32", **kwargs) -> Engine:
    """An engine on ``backend``, built as ``server.bootstrap`` builds it (slot budget = plan budget)."""
    from server.engine.engine import DEFAULT_CACHE_BYTES, default_plan_budget

    plans = kwargs.get("plan_cache_bytes")
    if plans is None:
        plans = default_plan_budget(base, kwargs.get("cache_bytes", DEFAULT_CACHE_BYTES))
    built = build_backend(backend, base, precision, slot_budget_bytes=plans)
    return Engine(base, backend=built, **{**kwargs, "plan_cache_bytes": plans})


def make_adapters(pipeline, count: int = 5) -> dict[str, LoraAdapter]:
    """Five adapters of different ranks; two also target a convolution (LoCon)."""
    shapes = module_shapes(pipeline)
    convs = sorted(key for key, shape in shapes.items() if len(shape) == 4 and key.startswith("unet.down"))
    adapters = {}
    for index, name in enumerate(ADAPTER_NAMES[:count]):
        adapter = random_adapter(shapes, seed=100 + index, rank=2 + 2 * index, strength=0.2)
        if index % 2:
            extra = random_adapter(shapes, seed=200 + index, rank=3, targets=convs[:2], strength=0.2)
            adapter = LoraAdapter(modules={**adapter.modules, **extra.modules})
        adapters[name] = adapter
    return adapters


def make_engine(pipeline, name: str, adapters: dict[str, LoraAdapter], **kwargs) -> Engine:
    base = base_from(pipeline, name)
    resolver = MemoryResolver()
    for adapter_name, adapter in adapters.items():
        resolver.add_adapter(adapter_name, adapter)
    return Engine(base, resolver=resolver, **kwargs)


@pytest.fixture(autouse=True, scope="module")
def _on_one_thread(one_thread):
    """Every test here runs torch on one thread (the shared ``one_thread`` fixture)."""


@pytest.fixture(scope="session")
def micro_adapters(micro_pipeline) -> dict[str, LoraAdapter]:
    return make_adapters(micro_pipeline)


@pytest.fixture()
def micro_engine(micro_pipeline, micro_adapters) -> Engine:
    return make_engine(micro_pipeline, "micro", micro_adapters)
