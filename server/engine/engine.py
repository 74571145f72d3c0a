"""The resident engine: one base model, any blend of adapters per request, fused in place.

Thread model: ``generate_batch`` may be called from any thread; the blend swap
and the denoising run together under one lock, so a request sees one blend from
its first step to its last. Adapter loading and parsing happen outside that lock:
``prefetch`` loads a queued request's adapters ahead, on the scheduler's prefetch
thread, and one load of an adapter is shared by every thread asking for it meanwhile.
The scheduler (``server.engine.scheduler``) is the usual caller; requests reach
it normalized and resolved (``Job``), so the engine never asks the store where
a reference points.

The engine owns the pipeline it is given: it repoints the parameters of the
modules blends touch, so do not move the pipeline (``.to(...)``) afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from adapters.blend import LINEAR, Merge, Weight, as_weight
from adapters.canonical import BaseModelRef
from adapters.errors import (
    AdapterIncompatible,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    LoraloomError,
    NotFound,
    OutOfMemory,
    ResourceExhausted,
)
from adapters.store.names import parse_ref
from adapters.validation import validate_against_base
from server.engine.cache import (
    ByteLRU,
    host_free_bytes,
    host_memory_bytes,
    plan_budget_bytes,
    plan_headroom_bytes,
)
from server.engine.compiled import CompileSettings, compile_engine_unet
from server.engine.denoise import BeforeStep, DenoiseOutput, denoise_batch
from server.engine.fuse import FusedWeights, PreparedAdapter
from server.engine.plan import BlendPlan, EngineBackend, TorchBackend, bias_key
from server.engine.preview import latent_preview
from server.engine.request import NormalizedRequest, check_blend, normalize
from server.engine.resolvers import AdapterResolver, MemoryResolver, resolve_one
from server.engine.sampler_names import sampler_name
from server.engine.samplers import check_options
from server.engine.types import (
    EngineStats,
    GenerateRequest,
    GenerateResult,
    GenerationParameters,
    GenerationSettings,
    Job,
    Limits,
    Progress,
    ResidentAdapter,
    ResolvedAdapter,
    ResolvedBlend,
    Timings,
)
from server.models.families import family_of
from server.models.shapes import lora_targets
from server.settings import EngineSettings

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = EngineSettings().cache_bytes
WARM_UP_KEY = "warm-up"  # the warm-up adapter's key in its plan: never a sha256
PREVIEW_SIZE = 64  # a preview's longer side in pixels (the image's own when smaller): in the .proto

ProgressCallback = Callable[[Progress], None]


class CancelFlag(Protocol):
    """Anything with ``is_set()`` (a ``threading.Event``): polled between denoising steps."""

    def is_set(self) -> bool: ...


def signature_id(signature: Sequence[tuple[str, float]]) -> str:
    """A short stable id of a blend signature; ``""`` for the base model alone."""
    if not signature:
        return ""
    text = ";".join(f"{sha}:{weight!r}" for sha, weight in signature)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BatchEntry:
    """One request of a batch, with its own progress callback, cancel flag and time queued."""

    job: Job
    on_progress: ProgressCallback | None = None
    cancel: CancelFlag | None = None
    queue_ms: float = 0.0


class Engine:
    """Keeps ``base`` resident and runs txt2img requests on it under any adapter blend."""

    def __init__(
        self,
        base: Any,
        *,
        backend: EngineBackend | None = None,
        resolver: AdapterResolver | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        plan_cache_bytes: int | None = None,
        limits: Limits | None = None,
        before_step: BeforeStep | None = None,
        compile: bool | CompileSettings = False,
        free_memory: Callable[[], int | None] | None = None,
        w0_on_host: bool = False,
    ) -> None:
        """``base`` is a ``server.models.loader.BaseModel``.

        ``backend`` runs the denoising loop's components (default: the pipeline's own
        torch modules); build it before any blend is applied (it takes the base's
        weights as its pristine ``W0``): ``server.bootstrap`` does. Adapter keys of the
        modules a backend runs go to it only.
        ``cache_bytes`` bounds the prepared adapters (LRU, pinning). Blend plans
        (stacked factors, and the blend's weights when they fit, which makes a
        swap to it nearly free) are kept apart, in ``plan_cache_bytes`` (default
        ``default_plan_budget``: 40 % of the memory the weights' device has
        beside the base model, bounded).
        ``before_step(index, total)`` is a seam called before every denoising step
        (fault injection in tests: a slow step, a failure).
        ``compile`` (torch backend): ``torch.compile`` the UNet in place; swaps do not
        recompile (``server.engine.compiled``).
        ``free_memory()``: the bytes still free on the weights' device (default: the host's
        ``MemAvailable`` or the container's, a GPU's free memory); a blend's weights are kept
        only while ``plan_headroom_bytes`` stays free beside them.
        ``w0_on_host``: keep ``W0`` in (pinned) host memory and write blends in place
        (``FusedWeights``): one copy of each weight on a GPU; no blend is kept computed.
        """
        self.base = base
        self.pipeline = base.pipeline
        self.family = family_of(self.pipeline)
        for component in self.family.weight_components:
            getattr(self.pipeline, component).requires_grad_(False).eval()
        targets = lora_targets(self.pipeline)
        self.module_names = frozenset(targets)
        self._shapes = {key: tuple(module.weight.shape) for key, module in targets.items()}
        self._base_ref = BaseModelRef(architecture=getattr(base, "architecture", "") or "")
        self.resolver: AdapterResolver = resolver or MemoryResolver()
        self.limits = limits or Limits()
        self._before_step = before_step
        self._fused = FusedWeights(targets, w0_on_host=w0_on_host)
        if w0_on_host:
            log.info(
                "W0 in %s host memory (%d MiB): blends are written in place",
                "pinned" if self.base_on_gpu else "plain",
                self._fused.host_bytes >> 20,
            )
        self._backend: EngineBackend = backend or TorchBackend()
        # Keys the backend writes itself; the fused torch path writes the rest. A layer's bias
        # (written by adapters with bias differences) is the backend's only if it says so.
        self._backend_keys = frozenset(key for key in targets if self._backend.owns(key)) | frozenset(
            bias_key(key) for key in targets if self._backend.owns(bias_key(key))
        )
        if compile:  # in place and lazy: graphs are built on the first request of each shape
            compile_engine_unet(self.pipeline, self._backend.name, compile)
        self.backend = self._backend.name
        self.precision = self._backend.precision
        # What a request for the "default" sampler reports (the base scheduler's own name).
        self.default_sampler = sampler_name(self.pipeline.scheduler)
        self._run_pipeline = self._backend.view(self.pipeline)
        plan_budget = default_plan_budget(base, cache_bytes) if plan_cache_bytes is None else plan_cache_bytes
        self._cache: ByteLRU[PreparedAdapter] = ByteLRU(cache_bytes)
        self._plans: ByteLRU[BlendPlan] = ByteLRU(plan_budget)
        self._free_memory = free_memory or device_free_memory(base)
        self._headroom = plan_headroom_bytes(device_memory_bytes(base))
        self._cache_lock = threading.Lock()
        self._run_lock = threading.RLock()
        # sha256 -> the load under way (one load per adapter however many threads ask for it).
        self._loading: dict[str, Future[PreparedAdapter]] = {}
        # sha256s of the blends being generated or activated now: a prefetch never evicts them.
        self._busy: Counter[str] = Counter()
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
    def base_on_gpu(self) -> bool:
        return _weights_device(self.base).type == "cuda"

    @property
    def plan_capacity_bytes(self) -> int:
        """The blend-plan cache's byte budget (materialized blends are held in it)."""
        return self._plans.capacity_bytes

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
                plan_capacity_bytes=self._plans.capacity_bytes,
                blend_signature=self.blend_signature,
            )

    def resident(self) -> list[ResidentAdapter]:
        """Adapter versions held in the cache, most recently used first."""
        with self._cache_lock:
            return [
                ResidentAdapter(value.name, value.version, value.sha256, nbytes, pinned)
                for _, value, nbytes, pinned in self._cache.items()
            ]

    # ------------------------------------------------------------ requests

    def normalize(self, request: GenerateRequest) -> NormalizedRequest:
        """Validate ``request`` against this engine's limits and base size (no I/O)."""
        factor = int(getattr(self.pipeline, "vae_scale_factor", 8))
        normal = normalize(request, self.limits, resolution=self.resolution, size_factor=factor)
        settings = normal.settings
        check_options(settings.sampler, settings.schedule, settings.eta, self.pipeline.scheduler)
        encoders = [getattr(self.pipeline, name) for name in self.family.text_encoders]
        depth = min(encoder.config.num_hidden_layers for encoder in encoders)
        if settings.clip_skip > depth:
            raise InvalidArgument(
                f"clip_skip {settings.clip_skip} is deeper than this base model's text encoder "
                f"({depth} layers): use 1 to {depth}"
            )
        return normal

    def resolve_blend(self, adapters: Sequence[tuple[str, Weight]], merge: Merge = LINEAR) -> ResolvedBlend:
        """Resolve refs to exact versions with one resolver call (one statement for a store).
        A weight is a float or ``PartWeights`` (text encoder, UNet)."""
        adapters = tuple((str(ref), as_weight(weight)) for ref, weight in adapters)
        check_blend(adapters, self.limits)
        resolved = self.resolver.resolve([ref for ref, _ in adapters]) if adapters else []
        return ResolvedBlend.of(zip(resolved, (w for _, w in adapters), strict=True), merge)

    def job(self, request: GenerateRequest) -> Job:
        """``request`` normalized and resolved: what the scheduler queues."""
        normal = self.normalize(request)
        return Job(normal.settings, self.resolve_blend(normal.adapters, normal.merge), normal.options)

    # ------------------------------------------------------------ adapters

    def load(self, ref: str, pin: bool = False) -> ResidentAdapter:
        """Resolve ``ref``, load it into the cache (if not there) and optionally pin it."""
        resolved = resolve_one(self.resolver, ref)
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
        parsed = parse_ref(ref)
        with self._cache_lock:
            entries = [(key, value) for key, value, *_ in self._cache.items()]
        if parsed.alias is not None:
            try:
                shas = {resolve_one(self.resolver, ref).sha256}
            except NotFound:
                return False
            matches = [key for key, value in entries if value.sha256 in shas]
        else:
            matches = [
                key
                for key, value in entries
                if value.name == parsed.name and parsed.version in (None, value.version)
            ]
        with self._cache_lock:
            for key in matches:
                self._cache.pop(key)
        return bool(matches)

    def prefetch(self, blend: ResolvedBlend, protect: Collection[str] = ()) -> int:
        """Load the adapters of ``blend`` (a queued request's) into the cache ahead of its run;
        returns how many were loaded. Never takes the run lock: the scheduler calls it on its
        prefetch thread while another request generates. What is cached (or being loaded) is
        skipped; an adapter is kept only if it fits without evicting a pinned one, one of the
        blends being generated or written into the weights now, one of ``blend``'s own or one
        in ``protect`` (the adapters of the blends queued ahead of it); else it is dropped.
        Errors are logged at debug level and swallowed: the request's own load reports them.
        A blend whose plan is cached (or that is written now) needs no adapter: nothing is loaded.
        """
        if self._needs_no_adapters(blend):
            return 0
        shas = {resolved.sha256 for resolved, _ in blend.entries}
        loaded = 0
        for resolved, _ in blend.entries:
            with self._cache_lock:
                if resolved.sha256 in self._cache or resolved.sha256 in self._loading:
                    continue
                keep = frozenset(protect).union(shas, self._busy, (sha for sha, _ in self._fused.signature))
                if self._cache.capacity_bytes <= self._held_bytes_locked(keep):
                    log.debug("prefetch of %s skipped: the adapter cache has no room to give", resolved.ref)
                    return loaded
            try:
                self._prepared(resolved, keep=keep)
            except Exception as error:
                log.debug("prefetch of %s failed (its request will report it): %s", resolved.ref, error)
                continue
            loaded += 1
        return loaded

    def _held_bytes_locked(self, keep: Collection[str]) -> int:
        """Bytes of the cache a prefetch may not free: pinned entries and those in ``keep``."""
        return sum(nbytes for key, _, nbytes, pinned in self._cache.items() if pinned or key in keep)

    def _evicts_locked(self, nbytes: int, keep: Collection[str]) -> bool:
        """Whether putting ``nbytes`` would evict (or be refused over) an entry in ``keep`` or a
        pinned one: ``ByteLRU.put`` evicts the least recently used unpinned entries first."""
        if self._cache.capacity_bytes < nbytes + self._held_bytes_locked(()):
            return True
        excess = self._cache.used_bytes + nbytes - self._cache.capacity_bytes
        for key, _, size, pinned in reversed(list(self._cache.items())):  # least recently used first
            if excess <= 0:
                return False
            if pinned:
                continue
            if key in keep:
                return True
            excess -= size
        return excess > 0

    def _prepared(self, resolved: ResolvedAdapter, *, keep: Collection[str] | None = None) -> PreparedAdapter:
        """The prepared adapter, from the cache or loaded (and cached). While one thread loads an
        adapter, the others asking for it wait for that load instead of loading it again (if it
        fails, each then loads it itself and meets its own error). ``keep`` (a prefetch): count
        no hit, and cache the adapter only if that evicts nothing in ``keep`` (``_evicts_locked``)."""
        key = resolved.sha256
        while True:
            with self._cache_lock:
                prepared = self._cache.get(key)
                if prepared is not None:
                    if keep is None:
                        self._hits += 1
                    return prepared
                loading = self._loading.get(key)
                if loading is None:
                    loading = self._loading[key] = Future()
                    self._misses += 1
                    break
            try:
                prepared = loading.result()
            except Exception:
                continue  # that load failed: this caller loads it itself and meets its own error
            if keep is None:
                with self._cache_lock:
                    self._hits += 1
                    if key not in self._cache:  # a prefetch did not keep it: a request's load does
                        self._cache.put(key, prepared, prepared.nbytes)
            return prepared
        try:
            prepared = self._load(resolved)
        except BaseException as error:
            with self._cache_lock:
                self._loading.pop(key, None)
            loading.set_exception(error)
            raise
        with self._cache_lock:
            self._loading.pop(key, None)
            existing = self._cache.peek(key)
            if existing is not None:
                prepared = existing
            elif keep is not None and self._evicts_locked(prepared.nbytes, keep):
                log.debug("prefetched %s not kept: it would evict an adapter in use or queued", resolved.ref)
            else:
                try:
                    self._cache.put(key, prepared, prepared.nbytes)
                except BaseException as error:
                    loading.set_exception(error)
                    raise
        loading.set_result(prepared)
        return prepared

    def _load(self, resolved: ResolvedAdapter) -> PreparedAdapter:
        """Read, parse, validate and prepare ``resolved`` (no cache, no lock)."""
        adapter = resolved.load(self.module_names)
        try:
            validate_against_base(adapter, self._shapes, self._base_ref, max_rank=self.limits.max_rank)
        except LoraloomError as error:
            raise type(error)(f"adapter {resolved.ref}: {error}") from None
        prepared = self._fused.prepare(
            adapter, name=resolved.name, version=resolved.version, sha256=resolved.sha256
        )
        self._check_backend_writes(prepared)
        return prepared

    def _check_backend_writes(self, prepared: PreparedAdapter) -> None:
        """Refuse a bias difference on a layer the backend runs but whose bias it cannot write."""
        refused = sorted(
            key
            for key, module in prepared.modules.items()
            if module.bias is not None
            and key in self._backend_keys
            and bias_key(key) not in self._backend_keys
        )
        if refused:
            raise AdapterIncompatible(
                f"adapter {prepared.name}@{prepared.version} changes the biases of {len(refused)} layer(s) "
                f"(e.g. {refused[0]}), which the {self._backend.label} backend cannot write; serve it "
                "with --backend torch"
            )

    def _plan(self, blend: ResolvedBlend, prepared: Sequence[tuple[PreparedAdapter, Weight]]) -> BlendPlan:
        signature = blend.signature
        with self._cache_lock:
            plan = self._plans.get(signature)
        if plan is not None:
            return plan
        plan = self._fused.plan(prepared, blend.merge)
        part = self._torch_part(plan)  # materialized weights only for what torch runs
        materialized = self._fused.materialized_bytes(part)
        if self._may_materialize(plan.update_bytes + materialized, materialized):
            with self._cache_lock:  # room first: an evicted blend's memory is reused, not faulted in anew
                evicted = self._plans.make_room(plan.update_bytes + materialized)
            for old in evicted:
                self._fused.recycle(old)
            self._fused.materialize(part)
            plan.weights = part.weights
            plan.release_materialized()
        with self._cache_lock:
            try:
                self._plans.put(signature, plan, plan.nbytes)
            except ResourceExhausted:  # larger than the plan budget: used once, not kept
                log.debug("blend plan of %d bytes not cached", plan.nbytes)
        return plan

    def _may_materialize(self, needed: int, materialized: int) -> bool:
        """Whether a new blend's weights (``materialized`` bytes; ``needed`` with its factors) are
        kept with its plan: they fit the plan budget beside the blend written now (evicting that
        one to make room would turn every switch between the two into a full rewrite; the new
        one goes to the scratch buffers instead, which keep it until another blend needs them,
        so alternating between them only repoints), and the device keeps ``PLAN_HEADROOM`` of
        its memory free after them (the budget is a share of the memory; this is what is free)."""
        if not self._fused.keeps_blends:
            return False
        with self._cache_lock:
            current = self._plans.nbytes_of(self._fused.signature) if self._fused.signature else 0
            if needed > self._plans.capacity_bytes - current:
                return False
        free = self._free_memory()
        fresh = materialized - self._fused.reusable_bytes(materialized)  # a spare slab is no new memory
        if free is not None and free - fresh < self._headroom:
            log.info(
                "blend weights of %d MiB not kept: %d MiB free, %d MiB kept free for generating",
                materialized >> 20,
                free >> 20,
                self._headroom >> 20,
            )
            return False
        return True

    @contextmanager
    def _in_use(self, blend: ResolvedBlend) -> Iterator[None]:
        """Mark ``blend``'s adapters as being generated or written: a prefetch never evicts them."""
        shas = [resolved.sha256 for resolved, _ in blend.entries]
        with self._cache_lock:
            self._busy.update(shas)
        try:
            yield
        finally:
            with self._cache_lock:
                self._busy.subtract(shas)
                self._busy += Counter()  # drop the keys at zero

    def _prepare_blend(
        self, blend: ResolvedBlend
    ) -> tuple[list[tuple[PreparedAdapter, Weight]] | None, float]:
        """Load (outside the run lock) what a blend needs; returns (prepared, ms). ``None``: nothing
        to load, the blend is written now or its plan is cached (a swap to it needs no adapter:
        at SDXL size reading its two adapters again took 1.6 s of a switch)."""
        if self._needs_no_adapters(blend):
            return None, 0.0
        started = time.perf_counter()
        prepared = [(self._prepared(resolved), weight) for resolved, weight in blend.entries]
        return prepared, (time.perf_counter() - started) * 1000.0

    def _needs_no_adapters(self, blend: ResolvedBlend) -> bool:
        """Whether ``blend`` is written now or its plan is cached (a swap to it reads no adapter)."""
        with self._cache_lock:
            return blend.signature == self._fused.signature or blend.signature in self._plans

    def _swap(self, blend: ResolvedBlend, prepared: Sequence[tuple[PreparedAdapter, Weight]] | None) -> float:
        """Write the blend into the weights (caller holds the run lock); returns ms (0: already there).
        ``prepared`` is ``None`` when the blend's plan was cached (``_prepare_blend``)."""
        if blend.signature == self._fused.signature:
            return 0.0
        started = time.perf_counter()
        plan = None
        if blend.entries:
            if prepared is None:
                with self._cache_lock:
                    cached = blend.signature in self._plans
                if not cached:  # evicted since: load what it needs now
                    prepared = [(self._prepared(resolved), weight) for resolved, weight in blend.entries]
            plan = self._plan(blend, prepared or ())
        self._fused.apply(self._torch_part(plan))
        self._backend.apply(plan)
        swap_ms = (time.perf_counter() - started) * 1000.0
        self._swaps += 1
        self._swap_ms_total += swap_ms
        self._swap_ms_last = swap_ms
        return swap_ms

    def _torch_part(self, plan: BlendPlan | None) -> BlendPlan | None:
        """``plan`` less the keys of modules the backend runs (they go to the backend only)."""
        if plan is None or not self._backend_keys:
            return plan
        return plan.only(plan.updates.keys() - self._backend_keys)

    def activate(
        self, blend: ResolvedBlend | Sequence[tuple[str, Weight]]
    ) -> tuple[ResolvedBlend, float, float]:
        """Write a blend (refs are resolved; ``[]``: the base) into the weights now;
        returns (the resolved blend, load ms, swap ms)."""
        if not isinstance(blend, ResolvedBlend):
            blend = self.resolve_blend(blend)
        with self._in_use(blend):
            prepared, load_ms = self._prepare_blend(blend)
            with self._run_lock:
                swap_ms = self._swap(blend, prepared)
        return blend, load_ms, swap_ms

    def warm_up(self) -> float:
        """Write one blend and restore the base, so that a user's first swap does not pay the
        process's one-time costs (parsing a file, the swap's kernels at every thread count they
        run with, the scratch buffers of a blend the plan cache cannot hold). The blend is a
        synthetic rank-1 adapter over the modules a typical LoRA trains (kohya's defaults), read
        from its file bytes like a stored version and written as a user's blend would be; nothing
        of it stays cached but its memory (its blend's weights, or the scratch buffers of a blend
        too large to keep), which the first user blend of about its size reuses.
        Returns the milliseconds it took."""
        from adapters.formats import load_adapter, save_canonical
        from server.engine.synthetic import kohya_targets, random_adapter

        started = time.perf_counter()
        targets = kohya_targets(self._shapes) or sorted(self._shapes)[:1]
        data = save_canonical(random_adapter(self._shapes, seed=0, rank=1, targets=targets))
        adapter = load_adapter(data, module_names=self.module_names)
        validate_against_base(adapter, self._shapes, self._base_ref, max_rank=self.limits.max_rank)
        prepared = self._fused.prepare(adapter, name="warm-up", version=1, sha256=WARM_UP_KEY)
        with self._run_lock:
            plan = self._fused.plan([(prepared, 1.0)])
            part = self._torch_part(plan)
            kept = part.update_bytes + self._fused.materialized_bytes(part) <= self._plans.capacity_bytes
            if kept and self._fused.keeps_blends:
                self._fused.materialize(part)
            for torch_part, whole in ((part, plan), (None, None)):  # the blend, then the base
                self._fused.apply(torch_part)
                self._backend.apply(whole)
            self._fused.recycle(part)  # its memory, faulted in, for the first user blend
        return (time.perf_counter() - started) * 1000.0

    def prepare_decode(self, settings: GenerationSettings) -> None:
        """Get the VAE decoder ready for ``settings``' images without decoding any: a backend's
        decoder compiled per shape (``prepare(latent_shape)``) compiles now; torch's needs nothing."""
        vae = self._run_pipeline.vae
        prepare = getattr(vae, "prepare", None)
        if prepare is None:
            return
        factor = int(getattr(self.pipeline, "vae_scale_factor", 8))
        channels = int(vae.config.latent_channels)
        with self._run_lock:
            prepare((len(settings.seeds), channels, settings.height // factor, settings.width // factor))

    # ------------------------------------------------------------ generating

    def generate(
        self,
        request: GenerateRequest | Job,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: CancelFlag | None = None,
        queue_ms: float = 0.0,
    ) -> GenerateResult:
        """Run one request to the end (blocking) and return its images and exact parameters."""
        job = request if isinstance(request, Job) else self.job(request)
        outcome = self.generate_batch([BatchEntry(job, on_progress, cancel, queue_ms)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def generate_batch(self, entries: Sequence[BatchEntry]) -> list[GenerateResult | Exception]:
        """Run jobs of one blend and batch key as one batch; one outcome each.

        A request that is cancelled or runs past its deadline fails on its own
        (its outcome is the error) between steps, while the others run on; an
        error that concerns them all (an unloadable adapter, a failing step) is raised.
        """
        with self._in_use(entries[0].job.blend):
            return self._generate_batch(entries)

    def _generate_batch(self, entries: Sequence[BatchEntry]) -> list[GenerateResult | Exception]:
        jobs = [entry.job for entry in entries]
        first = jobs[0]
        if any(
            job.blend.signature != first.blend.signature or job.settings.batch_key != first.settings.batch_key
            for job in jobs
        ):
            raise ValueError("a batch must share one blend, size, step count, guidance and sampler")
        failed: dict[int, Exception] = {}

        def check(number: int) -> None:
            if number in failed:
                return
            entry = entries[number]
            deadline = entry.job.options.deadline
            # The deadline first: gRPC also cancels a call whose deadline passed.
            if deadline is not None and time.monotonic() >= deadline:
                failed[number] = DeadlineExceeded("the request ran past its deadline")
            elif entry.cancel is not None and entry.cancel.is_set():
                failed[number] = Cancelled("the request was cancelled")

        def check_all() -> list[int]:
            for number in range(len(entries)):
                check(number)
            return [number for number in range(len(entries)) if number not in failed]

        if not check_all():
            return [failed[number] for number in range(len(entries))]
        prepared, load_ms = self._prepare_blend(first.blend)
        outputs: dict[int, DenoiseOutput] = {}
        out_of_memory: str | None = None
        with self._run_lock:
            swap_ms = self._swap(first.blend, prepared)
            live = check_all()

            def before_step(index: int, total: int) -> None:
                if not check_all():
                    raise _Stopped
                if self._before_step is not None:
                    self._before_step(index, total)

            def before_stage(_stage: str) -> None:
                if not check_all():
                    raise _Stopped

            def after_step(position: int, done: int, total: int, latents: Any) -> None:
                number = live[position]
                entry = entries[number]
                if entry.on_progress is None or number in failed:
                    return
                every = entry.job.options.preview_every
                preview = None
                settings = entry.job.settings
                if every and (done % every == 0 or done == total):
                    size = min(PREVIEW_SIZE, max(settings.width, settings.height))
                    preview = latent_preview(latents, size=size, factors=self.family.latent_rgb)
                entry.on_progress(
                    Progress("step", step=done, total_steps=total, preview=preview, seed=settings.seed)
                )

            if live:
                try:
                    batch = denoise_batch(
                        self._run_pipeline,
                        [jobs[n].settings for n in live],
                        before_step=before_step,
                        after_step=after_step,
                        before_stage=before_stage,
                    )
                    outputs = dict(zip(live, batch, strict=True))
                except _Stopped:
                    pass
                except Exception as error:
                    if not is_out_of_memory(error):
                        raise
                    out_of_memory = str(error)  # raised below, once the failed frames are released
        if out_of_memory is not None:
            raise _out_of_memory(jobs, live, out_of_memory)
        check_all()  # a request cancelled during the last step or the decode fails too
        signature = signature_id(first.blend.signature)
        return [
            failed[number]
            if number in failed
            else _result(
                entry.job, outputs[number], signature, load_ms, swap_ms, entry.queue_ms, self.default_sampler
            )
            for number, entry in enumerate(entries)
        ]


def default_plan_budget(base: Any, cache_bytes: int = DEFAULT_CACHE_BYTES) -> int:
    """The blend-plan cache budget for ``base`` (a ``BaseModel``) when none is given: a share
    (``PLAN_MEMORY_FRACTION``) of the memory of the device its weights are on (the host's RAM or
    container limit, a GPU's memory) less the weights themselves, at least a quarter of
    ``cache_bytes``, at most 32 GiB (``server.engine.cache.plan_budget_bytes``)."""
    pipeline = base.pipeline
    model_bytes = 0
    for component in family_of(pipeline).weight_components:
        module = getattr(pipeline, component, None)
        if module is not None:
            model_bytes += sum(p.numel() * p.element_size() for p in module.parameters())
    return plan_budget_bytes(device_memory_bytes(base), model_bytes, floor=cache_bytes // 4)


def _weights_device(base: Any):
    import torch

    return torch.device(getattr(base, "device", "cpu"))


def device_memory_bytes(base: Any) -> int | None:
    """The memory of the device ``base``'s weights are on: a GPU's, or the host's (or its container's)."""
    import torch

    device = _weights_device(base)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    return host_memory_bytes()


def device_free_memory(base: Any) -> Callable[[], int | None]:
    """What says how much memory is still free on ``base``'s device (``torch.cuda.mem_get_info``
    on a GPU, ``host_free_bytes`` on the host)."""
    import torch

    device = _weights_device(base)
    if device.type == "cuda" and torch.cuda.is_available():
        return lambda: int(torch.cuda.mem_get_info(device)[0])
    return host_free_bytes


class _Stopped(Exception):
    """Every request of a batch was cancelled or ran out of time: stop denoising."""


OOM_RETRY_S = 5.0


def is_out_of_memory(error: BaseException) -> bool:
    """Torch's CUDA out-of-memory, a failed CPU allocation, or Python's ``MemoryError``."""
    import torch

    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
    )


def _out_of_memory(jobs: Sequence[Job], live: Sequence[int], error: str) -> OutOfMemory:
    """The request's memory is released (its tensors go with the frames), then the error for the client."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    settings = jobs[live[0]].settings
    log.warning("out of memory at %dx%d x%d: %s", settings.width, settings.height, len(live), error)
    return OutOfMemory(
        f"the server ran out of memory generating {settings.num_images} image(s) of "
        f"{settings.width}x{settings.height}; retry later, or ask for fewer or smaller images",
        retry_after_s=OOM_RETRY_S,
    )


def _result(
    job: Job,
    output: DenoiseOutput,
    signature: str,
    load_ms: float,
    swap_ms: float,
    queue_ms: float,
    default_sampler: str,
) -> GenerateResult:
    timings = Timings(
        queue_ms=queue_ms,
        load_ms=load_ms,
        swap_ms=swap_ms,
        encode_ms=output.encode_ms,
        denoise_ms=output.denoise_ms,
        decode_ms=output.decode_ms,
    )
    return GenerateResult(
        images=output.images,
        parameters=GenerationParameters.of(job.settings, job.blend, default_sampler=default_sampler),
        blend_signature=signature,
        timings=timings,
        request_id=job.options.request_id,
    )
