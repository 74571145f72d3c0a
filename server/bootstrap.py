"""The composition root: builds the store, backend, engine, scheduler and service from the settings.

The only module that knows every part: the parts themselves are handed what
they need (the engine a built backend and a resolver, the store its settings),
so none of them reads the environment or builds another.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from server.settings import Settings

log = logging.getLogger(__name__)

BeforeStep = Callable[[int, int], None]


def build_service(settings: Settings, *, before_step: BeforeStep | None = None):
    """Load the base model, open the store (validating uploads against it), start the engine.

    ``before_step(index, total)`` is the engine's seam called before every denoising
    step (tests use it to slow steps down or inject failures). Returns a started
    ``server.service.LoraloomService``.
    """
    import torch

    from adapters.store.store import open_store
    from adapters.store.validation import make_validator
    from server.backends.select import build_backend, choose_backend
    from server.engine import Engine, StoreResolver
    from server.engine.engine import default_plan_budget
    from server.engine.scheduler import Scheduler
    from server.models.loader import load_base_model
    from server.service import LoraloomService

    model, engine_settings = settings.model, settings.engine
    base = load_base_model(
        model.model,
        device=model.device,
        dtype=getattr(torch, model.dtype),
        prediction_type=model.prediction_type,
    )
    validator = make_validator(base.module_shapes, base.base_ref, max_rank=settings.limits.max_rank)
    store = open_store(settings.store, validator=validator)
    try:
        name, precision = choose_backend(
            engine_settings.backend,
            engine_settings.precision,
            base.device.type,
            model.dtype,
            compile=engine_settings.compile,
        )
        asked = f"{engine_settings.backend}/{engine_settings.precision}"
        log.info("backend %s, precision %s (configured %s)", name, precision, asked)
        plan_budget = engine_settings.plan_cache_bytes
        if plan_budget is None:
            plan_budget = default_plan_budget(base, engine_settings.cache_bytes)
        sized = "configured" if engine_settings.plan_cache_bytes is not None else "sized from the memory"
        log.info(
            "adapter cache %d MiB, blend-plan cache %d MiB (%s)",
            engine_settings.cache_bytes >> 20,
            plan_budget >> 20,
            sized,
        )
        # Before any blend: the backend takes the base's weights as its pristine W0.
        backend = build_backend(
            name,
            base,
            precision,
            slot_budget_bytes=plan_budget,
            compile_cache=engine_settings.compile_cache,
        )
        engine = Engine(
            base,
            backend=backend,
            resolver=StoreResolver(store, ttl_s=settings.store.resolve_ttl_s),
            cache_bytes=engine_settings.cache_bytes,
            plan_cache_bytes=plan_budget,
            limits=settings.limits,
            before_step=before_step,
            compile=engine_settings.compile,
            w0_on_host=engine_settings.w0_on_host,
        )
        scheduler = Scheduler(
            engine,
            max_queue=settings.scheduler.max_queue,
            max_group_skips=settings.scheduler.max_group_skips,
            max_batch=settings.scheduler.max_batch,
        )
    except BaseException:
        store.close()
        raise
    return LoraloomService(settings, base, store, engine, scheduler)
