"""The resident engine: one base model, any blend of adapters per request, fused in place.

Thread model: ``generate`` may be called from any thread; the blend swap and
the denoising run together under one lock, so a request sees one blend from its
first step to its last. Adapter loading and parsing happen outside that lock.
The scheduler (``server.engine.scheduler``) is the usual caller.

The engine owns the pipeline it is given: it repoints the parameters of the
modules blends touch, so do not move the pipeline (``.to(...)``) afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from adapters.blend import Blend
from adapters.canonical import BaseModelRef
from adapters.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    LoraloomError,
    NotFound,
    ResourceExhausted,
)
from adapters.validation import validate_against_base
from server.engine.cache import ByteLRU
from server.engine.compiled import CompileSettings, compile_engine_unet
from server.engine.denoise import BeforeStep, DenoiseJob, DenoiseOutput, batchable, denoise_batch
from server.engine.fuse import BlendPlan, FusedWeights, PreparedAdapter
from server.engine.preview import latent_preview
from server.engine.prompt import parse_prompt
from server.engine.resolvers import AdapterResolver, MemoryResolver, ResolvedAdapter
from server.engine.samplers import check_sampler
from server.engine.types import (
    AppliedAdapter,
    EngineStats,
    GenerateRequest,
    GenerateResult,
    GenerationParameters,
    Limits,
    Progress,
    ResidentAdapter,
    Timings,
)
from server.models.shapes import lora_targets

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 2 * 1024**3
MAX_SEED = 2**63 - 1
PREVIEW_SIZE = 64

ProgressCallback = Callable[[Progress], None]


class CancelFlag(Protocol):
    """Anything with ``is_set()`` (a ``threading.Event``): polled between denoising steps."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class NormalizedRequest:
    """A validated request: tags parsed out of the prompt, defaults filled, seed chosen."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str
    num_images: int
    adapters: tuple[tuple[str, float], ...]
    preview_every: int
    deadline: float | None

    @property
    def group_key(self) -> tuple[tuple[str, float], ...]:
        """The blend as asked (refs, not yet versions): what the scheduler groups by."""
        merged: dict[str, float] = {}
        for ref, weight in self.adapters:
            merged[ref] = merged.get(ref, 0.0) + weight
        return tuple(sorted((ref, weight) for ref, weight in merged.items() if weight != 0.0))


def signature_id(signature: Sequence[tuple[str, float]]) -> str:
    """A short stable id of a blend signature; ``""`` for the base model alone."""
    if not signature:
        return ""
    text = ";".join(f"{sha}:{weight!r}" for sha, weight in signature)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Engine:
    """Keeps ``base`` resident and runs txt2img requests on it under any adapter blend."""

    def __init__(
        self,
        base: Any,
        *,
        resolver: AdapterResolver | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        plan_cache_bytes: int | None = None,
        limits: Limits | None = None,
        before_step: BeforeStep | None = None,
        backend: str = "torch",
        compile: bool | CompileSettings = False,
        precision: str = "fp32",
    ) -> None:
        """``base`` is a ``server.models.loader.BaseModel``.

        ``cache_bytes`` bounds the prepared adapters (LRU, pinning). Blend plans
        (stacked factors, and the blend's weights when they fit, which makes a
        swap to it nearly free) are kept apart, in ``plan_cache_bytes`` (default
        a quarter of ``cache_bytes``).
        ``before_step(index, total)`` is a seam called before every denoising step
        (fault injection in tests: a slow step, a failure).
        ``backend`` runs the UNet on ``torch`` (the pipeline itself), ``onnxruntime`` or
        ``openvino`` (``server.backends``: same denoising loop, blends written into the
        backend's bound weights; openvino also runs the text encoder and decodes). Adapter keys
        of the modules a backend runs go to it only. ``precision`` (``fp32`` or
        ``bf16``, openvino only; bf16 falls back to fp32 on a CPU without native BF16).
        ``compile`` (torch backend): ``torch.compile`` the UNet in place; swaps do not recompile
        (``server.engine.compiled``).
        """
        self.base = base
        self.pipeline = base.pipeline
        for component in ("unet", "text_encoder", "vae"):
            getattr(self.pipeline, component).requires_grad_(False).eval()
        targets = lora_targets(self.pipeline)
        self.module_names = frozenset(targets)
        self._shapes = {key: tuple(module.weight.shape) for key, module in targets.items()}
        self._base_ref = BaseModelRef(architecture=getattr(base, "architecture", "") or "")
        self.resolver: AdapterResolver = resolver or MemoryResolver()
        self.limits = limits or Limits()
        self._before_step = before_step
        self._fused = FusedWeights(targets)
        from server.backends.select import build_backend, check_backend

        check_backend(backend, precision)
        if compile:  # in place and lazy: graphs are built on the first request of each shape
            compile_engine_unet(self.pipeline, backend, compile)
        self.backend = backend
        plan_budget = cache_bytes // 4 if plan_cache_bytes is None else plan_cache_bytes
        # Before any blend (it keeps W0); a backend may hold a second blend within the plans' budget.
        self._backend = build_backend(backend, base, precision, slot_budget_bytes=plan_budget)
        self.precision = self._backend.precision
        self._unet = self._backend.unet
        self._run_pipeline = self._backend.view(self.pipeline)
        self._cache: ByteLRU[PreparedAdapter] = ByteLRU(cache_bytes)
        self._plans: ByteLRU[BlendPlan] = ByteLRU(plan_budget)
        self._cache_lock = threading.Lock()
        self._run_lock = threading.RLock()
        self._hits = 0
        self._misses = 0
        self._swaps = 0
        self._swap_ms_total = 0.0
        self._swap_ms_last = 0.0

    # ------------------------------------------------------------ describing

    @property
    def resolution(self) -> int:
        return int(self.base.resolution)

    @property
    def backend_name(self) -> str:
        """The backend as shown to clients: ``torch``, ``onnxruntime``, ``openvino (bf16)``."""
        return self._backend.label

    @property
    def blend_signature(self) -> str:
        """The id of the blend currently written into the weights (``""``: the base)."""
        return signature_id(self._fused.signature)

    def stats(self) -> EngineStats:
        with self._cache_lock:
            return EngineStats(
                used_bytes=self._cache.used_bytes,
                capacity_bytes=self._cache.capacity_bytes,
                entries=len(self._cache),
                hits=self._hits,
                misses=self._misses,
                evictions=self._cache.evictions,
                swaps=self._swaps,
                swap_ms_total=self._swap_ms_total,
                swap_ms_last=self._swap_ms_last,
                scratch_bytes=self._fused.scratch_bytes,
                plan_bytes=self._plans.used_bytes,
                blend_signature=self.blend_signature,
            )

    def resident(self) -> list[ResidentAdapter]:
        """Adapter versions held in the cache, most recently used first."""
        with self._cache_lock:
            return [
                ResidentAdapter(value.name, value.version, value.sha256, nbytes, pinned)
                for _, value, nbytes, pinned in self._cache.items()
            ]

    # ------------------------------------------------------------ adapters

    def load(self, ref: str, pin: bool = False) -> ResidentAdapter:
        """Resolve ``ref``, load it into the cache (if not there) and optionally pin it."""
        resolved = self.resolver.resolve(ref)
        prepared = self._prepared(resolved)
        key = resolved.sha256
        with self._cache_lock:
            if key not in self._cache:  # evicted between load and now: put it back
                self._cache.put(key, prepared, prepared.nbytes, pin=pin)
            elif pin:
                self._cache.pin(key)
            pinned = self._cache.is_pinned(key)
        return ResidentAdapter(prepared.name, prepared.version, prepared.sha256, prepared.nbytes, pinned)

    def unload(self, ref: str) -> bool:
        """Drop (and unpin) resident versions matching ``ref``: ``name@N``, ``name`` (all), ``name@alias``."""
        name, _, selector = ref.partition("@")
        with self._cache_lock:
            entries = [(key, value) for key, value, *_ in self._cache.items()]
        if selector and not selector.isdigit():
            try:
                shas = {self.resolver.resolve(ref).sha256}
            except NotFound:
                return False
            matches = [key for key, value in entries if value.sha256 in shas]
        else:
            matches = [
                key
                for key, value in entries
                if value.name == name and (not selector or value.version == int(selector))
            ]
        with self._cache_lock:
            for key in matches:
                self._cache.pop(key)
        return bool(matches)

    def _prepared(self, resolved: ResolvedAdapter) -> PreparedAdapter:
        key = resolved.sha256
        with self._cache_lock:
            prepared = self._cache.get(key)
            if prepared is not None:
                self._hits += 1
                return prepared
            self._misses += 1
        adapter = resolved.load(self.module_names)
        try:
            validate_against_base(adapter, self._shapes, self._base_ref)
        except LoraloomError as error:
            raise type(error)(f"adapter {resolved.ref}: {error}") from None
        prepared = self._fused.prepare(
            adapter, name=resolved.name, version=resolved.version, sha256=resolved.sha256
        )
        with self._cache_lock:
            existing = self._cache.peek(key)
            if existing is not None:
                return existing
            self._cache.put(key, prepared, prepared.nbytes)
        return prepared

    def resolve_blend(self, adapters: Sequence[tuple[str, float]]) -> list[tuple[ResolvedAdapter, float]]:
        """Resolve refs to exact versions; the same version named twice has its weights summed."""
        if len(adapters) > self.limits.max_adapters:
            raise InvalidArgument(
                f"{len(adapters)} adapters in one blend; at most {self.limits.max_adapters} are allowed"
            )
        merged: dict[str, tuple[ResolvedAdapter, float]] = {}
        for ref, weight in adapters:
            resolved = self.resolver.resolve(ref)
            previous = merged.get(resolved.sha256)
            merged[resolved.sha256] = (resolved, weight + (previous[1] if previous else 0.0))
        return [(resolved, weight) for resolved, weight in merged.values() if weight != 0.0]

    def _plan(self, entries: Sequence[tuple[PreparedAdapter, float]]) -> BlendPlan:
        signature = Blend.of((prepared.sha256, weight) for prepared, weight in entries).signature
        with self._cache_lock:
            plan = self._plans.get(signature)
        if plan is not None:
            return plan
        plan = self._fused.plan(entries)
        part = self._torch_part(plan)  # materialized weights only for what torch runs
        if plan.factor_bytes + self._fused.materialized_bytes(part) <= self._plans.capacity_bytes:
            self._fused.materialize(part)
            plan.weights = part.weights
        with self._cache_lock:
            try:
                self._plans.put(signature, plan, plan.nbytes)
            except ResourceExhausted:
                plan.weights = None  # keep the factors only; swaps then write into scratch buffers
                try:
                    self._plans.put(signature, plan, plan.nbytes)
                except ResourceExhausted:  # larger than the plan budget: used once, not kept
                    log.debug("blend plan of %d bytes not cached", plan.nbytes)
        return plan

    def _prepare_blend(
        self, adapters: Sequence[tuple[str, float]]
    ) -> tuple[list[tuple[PreparedAdapter, float]], list[AppliedAdapter], float]:
        """Resolve and load (outside the run lock) what a blend needs; returns (prepared, applied, ms)."""
        started = time.perf_counter()
        prepared = [(self._prepared(r), w) for r, w in self.resolve_blend(adapters)]
        applied = sorted(
            (AppliedAdapter(p.name, p.version, p.sha256, w) for p, w in prepared),
            key=lambda a: (a.sha256, a.weight),
        )
        return prepared, applied, (time.perf_counter() - started) * 1000.0

    def _swap(self, prepared: Sequence[tuple[PreparedAdapter, float]]) -> float:
        """Write the blend into the weights (caller holds the run lock); returns ms (0: already there)."""
        signature = Blend.of((p.sha256, w) for p, w in prepared).signature
        if signature == self._fused.signature:
            return 0.0
        started = time.perf_counter()
        plan = self._plan(prepared) if prepared else None
        self._fused.apply(self._torch_part(plan))
        self._backend.apply(plan)
        swap_ms = (time.perf_counter() - started) * 1000.0
        self._swaps += 1
        self._swap_ms_total += swap_ms
        self._swap_ms_last = swap_ms
        return swap_ms

    def _torch_part(self, plan: BlendPlan | None) -> BlendPlan | None:
        """``plan`` less the keys of modules a backend runs (they go to the backend only)."""
        if plan is None or not self._backend.prefixes:
            return plan
        factors = {key: pair for key, pair in plan.factors.items() if not self._backend.owns(key)}
        if len(factors) == len(plan.factors):
            return plan
        weights = None if plan.weights is None else {key: plan.weights[key] for key in factors}
        return BlendPlan(signature=plan.signature, factors=factors, factor_bytes=0, weights=weights)

    def activate(self, adapters: Sequence[tuple[str, float]]) -> tuple[list[AppliedAdapter], float, float]:
        """Write a blend (``[]``: the base) into the weights now; returns (adapters, load ms, swap ms)."""
        prepared, applied, load_ms = self._prepare_blend(adapters)
        with self._run_lock:
            swap_ms = self._swap(prepared)
        return applied, load_ms, swap_ms

    # ------------------------------------------------------------ generating

    def normalize(self, request: GenerateRequest) -> NormalizedRequest:
        """Validate ``request``, parse prompt tags, fill defaults and pick a seed (no I/O)."""
        limits = self.limits
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise InvalidArgument("prompt is empty: say what to draw")
        parsed = parse_prompt(request.prompt)
        negative = parse_prompt(request.negative_prompt or "")
        if negative.adapters:
            raise InvalidArgument("<lora:...> tags belong in the prompt, not the negative prompt")
        width = int(request.width or self.resolution)
        height = int(request.height or self.resolution)
        factor = max(8, int(self.pipeline.vae_scale_factor))
        for label, value in (("width", width), ("height", height)):
            if value <= 0 or value > limits.max_size or value % factor:
                raise InvalidArgument(
                    f"{label} {value} is not allowed: use a multiple of {factor} from {factor} "
                    f"to {limits.max_size} pixels"
                )
        steps = int(request.steps)
        if not 1 <= steps <= limits.max_steps:
            raise InvalidArgument(f"steps {steps} is out of range: use 1 to {limits.max_steps}")
        guidance = float(request.guidance_scale)
        if not math.isfinite(guidance) or not 0.0 <= guidance <= 50.0:
            raise InvalidArgument(f"guidance_scale {guidance} is out of range: use 0 to 50 (1 disables it)")
        count = int(request.num_images)
        if not 1 <= count <= limits.max_images:
            raise InvalidArgument(f"num_images {count} is out of range: use 1 to {limits.max_images}")
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        if not 0 <= int(seed) <= MAX_SEED - count:
            raise InvalidArgument(f"seed {seed} is out of range: use 0 to {MAX_SEED - count}")
        adapters = [*((str(r), float(w)) for r, w in request.adapters), *parsed.adapters]
        for ref, weight in adapters:
            if not ref:
                raise InvalidArgument("an adapter reference is empty: give 'name', 'name@3' or 'name@alias'")
            if not math.isfinite(weight) or abs(weight) > limits.max_abs_weight:
                raise InvalidArgument(
                    f"adapter {ref!r} weight {weight} is out of range: use -{limits.max_abs_weight:g} "
                    f"to {limits.max_abs_weight:g}"
                )
        if len(adapters) > limits.max_adapters:
            raise InvalidArgument(f"{len(adapters)} adapters in one blend; at most {limits.max_adapters}")
        if request.preview_every < 0:
            raise InvalidArgument("preview_every must be >= 0")
        return NormalizedRequest(
            prompt=parsed.text,
            negative_prompt=negative.text,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance,
            seed=int(seed),
            scheduler=check_sampler(request.scheduler),
            num_images=count,
            adapters=tuple(adapters),
            preview_every=int(request.preview_every),
            deadline=request.deadline,
        )

    def generate(
        self,
        request: GenerateRequest | NormalizedRequest,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: CancelFlag | None = None,
        queue_ms: float = 0.0,
    ) -> GenerateResult:
        """Run one request to the end (blocking) and return its images and exact parameters."""
        normal = request if isinstance(request, NormalizedRequest) else self.normalize(request)
        outcome = self.generate_batch([BatchEntry(normal, on_progress, cancel, queue_ms)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def generate_batch(self, entries: Sequence[BatchEntry]) -> list[GenerateResult | Exception]:
        """Run requests of one blend and shape (``batchable``) as one batch; one outcome each.

        A request that is cancelled or runs past its deadline fails on its own
        (its outcome is the error) between steps, while the others run on; an
        error that concerns them all (unknown adapter, a failing step) is raised.
        """
        requests = [entry.request for entry in entries]
        jobs = [_job(request) for request in requests]
        if any(
            r.group_key != requests[0].group_key or not batchable(jobs[0], j)
            for r, j in zip(requests, jobs, strict=True)
        ):
            raise ValueError("a batch must share one blend, size, step count, guidance and sampler")
        failed: dict[int, Exception] = {}

        def check(number: int) -> None:
            if number in failed:
                return
            entry = entries[number]
            if entry.cancel is not None and entry.cancel.is_set():
                failed[number] = Cancelled("the request was cancelled")
            elif entry.request.deadline is not None and time.monotonic() >= entry.request.deadline:
                failed[number] = DeadlineExceeded("the request ran past its deadline")

        def check_all() -> list[int]:
            for number in range(len(entries)):
                check(number)
            return [number for number in range(len(entries)) if number not in failed]

        if not check_all():
            return [failed[number] for number in range(len(entries))]
        prepared, applied, load_ms = self._prepare_blend(requests[0].adapters)
        outputs: dict[int, DenoiseOutput] = {}
        with self._run_lock:
            swap_ms = self._swap(prepared)
            live = check_all()

            def before_step(index: int, total: int) -> None:
                if not check_all():
                    raise _Stopped
                if self._before_step is not None:
                    self._before_step(index, total)

            def after_step(position: int, done: int, total: int, latents: Any) -> None:
                number = live[position]
                entry = entries[number]
                if entry.on_progress is None or number in failed:
                    return
                every = entry.request.preview_every
                preview = None
                if every and (done % every == 0 or done == total):
                    preview = latent_preview(latents, size=PREVIEW_SIZE)
                entry.on_progress(Progress("step", step=done, total_steps=total, preview=preview))

            if live:
                try:
                    batch = denoise_batch(
                        self._run_pipeline,
                        [jobs[n] for n in live],
                        before_step=before_step,
                        after_step=after_step,
                    )
                    outputs = dict(zip(live, batch, strict=True))
                except _Stopped:
                    pass
        check_all()  # a request cancelled during the last step or the decode fails too
        signature = signature_id(tuple((a.sha256, a.weight) for a in applied))
        return [
            failed[number]
            if number in failed
            else _result(
                requests[number], outputs[number], applied, signature, load_ms, swap_ms, entry.queue_ms
            )
            for number, entry in enumerate(entries)
        ]


class _Stopped(Exception):
    """Every request of a batch was cancelled or ran out of time: stop denoising."""


@dataclass(frozen=True)
class BatchEntry:
    """One request of a batch, with its own progress callback, cancel flag and time queued."""

    request: NormalizedRequest
    on_progress: ProgressCallback | None = None
    cancel: CancelFlag | None = None
    queue_ms: float = 0.0


def _job(normal: NormalizedRequest) -> DenoiseJob:
    return DenoiseJob(
        prompt=normal.prompt,
        negative_prompt=normal.negative_prompt,
        width=normal.width,
        height=normal.height,
        steps=normal.steps,
        guidance_scale=normal.guidance_scale,
        seeds=[normal.seed + i for i in range(normal.num_images)],
        sampler=normal.scheduler,
    )


def _result(
    normal: NormalizedRequest,
    output: DenoiseOutput,
    applied: list[AppliedAdapter],
    signature: str,
    load_ms: float,
    swap_ms: float,
    queue_ms: float,
) -> GenerateResult:
    parameters = GenerationParameters(
        prompt=normal.prompt,
        negative_prompt=normal.negative_prompt,
        width=normal.width,
        height=normal.height,
        steps=normal.steps,
        guidance_scale=normal.guidance_scale,
        seed=normal.seed,
        scheduler=normal.scheduler,
        num_images=normal.num_images,
        adapters=tuple(applied),
    )
    timings = Timings(
        queue_ms=queue_ms,
        load_ms=load_ms,
        swap_ms=swap_ms,
        encode_ms=output.encode_ms,
        denoise_ms=output.denoise_ms,
        decode_ms=output.decode_ms,
    )
    return GenerateResult(
        images=output.images, parameters=parameters, blend_signature=signature, timings=timings
    )
