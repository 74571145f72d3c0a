"""Suite ``engine``: loraloom's resident engine vs diffusers + PEFT on the same model and adapter files.

Both sides run in this process on the same factory models (``tiny``, ``small``)
and load the same diffusers-format LoRA files (rank 8, UNet and text-encoder
attention). Measurements of the two sides are interleaved so that a busy CPU
slows both alike; figures are medians. Both sides use one torch thread unless
``--threads`` says otherwise (see ``THREADS``).

- ``swap_ms_*``: switch between two cached 2-adapter blends. loraloom:
  ``Engine.activate``; peer: its fastest fused path, ``unfuse_lora`` then
  ``set_adapters`` + ``fuse_lora``.
- ``blend_overhead_pct_tiny``: a 20-step generation with a blend active vs the
  base model. loraloom: fused blend vs base; peer: unfused ``set_adapters`` vs
  a plain pipeline.
- ``cold_load_ms_*``: first use of an adapter file never seen before. loraloom:
  read, parse, validate, prepare and apply it (``Engine.activate``); peer:
  ``load_lora_weights``.
- ``cold_load_ms_small_{loha,lokr}`` and ``swap_ms_small_{loha,lokr}``: the same
  two measurements with LyCORIS LoHa / LoKr files (network dim 8, UNet attention,
  kohya names), next to the LoRA rows. Their peer is lycoris-lora itself (its
  modules built from the file, ``merge_to``: how its merge tool, and A1111 and
  ComfyUI, apply such files): a cold load reads the file, builds the modules and
  merges them; a swap restores the weights the previous blend touched and merges
  the next blend's adapters one after the other. loraloom computes each file's
  dense update once, when it is prepared (cached), and writes ``W0 + update``.
- ``mixed_rps_*``: requests per second over requests cycling through 4 blends.
  loraloom: all submitted to the scheduler (grouped by blend, batches of up to
  4 requests); peer: all adapters loaded, ``set_adapters`` per request (what a
  user would write). The full run adds ``mixed_rps_tiny_unbatched``
  (``max_batch=1``, the scheduler's bit-exact default; 20 requests).
- ``*_tiny_sdxl``: swap, blend overhead and cold load on ``tiny-sdxl`` (two text
  encoders) against diffusers' ``StableDiffusionXLPipeline`` + PEFT; the adapter
  files cover the UNet and both text encoders' attention, and each side's swap,
  fuse and load covers all three components.

Real sizes (sections ``sd15`` and ``sdxl-base``, run only when named: they take
minutes and gigabytes): SD 1.5's and SDXL base 1.0's exact component configs with
seeded random weights (``bench.realsize``: built once, cached in the data folder;
SDXL in bfloat16 on a machine under 48 GB, as the ``swap_ms_sdxl`` note says),
four rank-32 diffusers-format LoRA files over the modules a kohya LoRA trains
(``kohya_targets``: UNet attention, feed-forward and ``proj_in``/``proj_out``, the
text encoders' attention and MLP; 264 modules at SD 1.5). The two sides run one
after the other, each holding the only copy of the model (two SDXL copies and a
blend do not fit 24 GB); run them on a quiet machine. loraloom's engine warms up
as ``loraloom serve`` does (``Engine.warm_up``); the peer is one diffusers pipeline.

- ``swap_ms_<size>``: switch between two cached 2-adapter blends (as above).
- ``first_blend_ms_<size>``: a blend of loaded adapters never used before (new
  weights each time). loraloom: plan, compute and keep its weights, apply; peer:
  the same unfuse, ``set_adapters``, fuse as for any switch (PEFT keeps nothing).
- ``cold_load_ms_<size>``: load an adapter file never read: loraloom reads,
  validates and prepares it into the adapter cache (``Engine.load``: what the
  scheduler does for a queued request while another generates); peer:
  ``load_lora_weights``.
- ``first_use_ms_<size>``: a file never read until the weights hold it. loraloom:
  load and write it (``Engine.activate``); peer: ``load_lora_weights`` again (its
  adapter runs unfused from then on, at a per-step cost).
- ``first_activation_ms_<size>``: the first blend a fresh server applies (two
  adapter files never read): loraloom after its warm-up (in the note); peer:
  ``load_lora_weights`` twice, ``set_adapters``, ``fuse_lora``.
- ``swap_pct_of_generation_<size>`` (full run, float32 only): the switch between
  cached blends as a share of one default generation (20 steps at the model's
  size, estimated from a 2- and a 4-step run) with a blend, each side on its own.
- ``rss_mb_<size>_torch``: resident memory of a fresh process after loading the
  model and applying a 2-adapter blend (loraloom: an engine with default
  settings; peer: ``from_pretrained``, two ``load_lora_weights``, ``fuse_lora``),
  each in its own subprocess.

Sections (``--only``/``--skip``): ``sd1`` (the LoRA rows on ``tiny`` and
``small``), ``lycoris``, ``mixed``, ``sdxl`` (``tiny-sdxl``); opt-in: ``sd15``,
``sdxl-base``.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.report import Metric, cpu_timed, median_ms, process_memory_mb, quiet_peers, run_script, timed
from server.engine import Engine, GenerateRequest, MemoryResolver
from server.engine.scheduler import Scheduler
from server.engine.synthetic import (
    attention_targets,
    diffusers_file,
    kohya_targets,
    random_adapter,
    random_lycoris,
)
from server.models.loader import BaseModel, load_base_model

PEER = "diffusers 0.42 + PEFT (LoHa/LoKr rows: lycoris-lora)"
# Both sides on one torch thread by default (``--threads`` overrides): on a shared
# 2-core machine two-thread pools oversubscribe the CPU and turn millisecond
# figures into noise; the comparison is the same either way.
THREADS = 1
RANK = 8
NAMES = ("a0", "a1", "a2", "a3")
BLEND_X = [("a0", 1.0), ("a1", 0.5)]
BLEND_Y = [("a2", 0.8), ("a3", 0.6)]
MIXED_BLENDS = [BLEND_X, BLEND_Y, [("a0", 0.5), ("a2", 0.5)], [("a1", 0.7), ("a3", -0.4)]]
PROMPT = "a watercolor fox in a snowy forest"
SECTIONS = ("sd1", "lycoris", "mixed", "sdxl", "sd15", "sdxl-base")
OPT_IN = ("sd15", "sdxl-base")  # real sizes: minutes and gigabytes, run only when named
REAL_SIZES = {"sd15": "sd15", "sdxl-base": "sdxl"}  # section -> bench.realsize model
REAL_RANK = 32
# The memory a real-size run needs (two copies of the model, blends, adapters) by model and dtype,
# in the order tried. SDXL in float32 is ~14 GB a copy: it does not run on a 24 GB machine (in
# float16 it would fit, but CPU float16 kernels are no measure of what users run). One SDXL
# blend over kohya's modules (both text encoders too) is 2.9e9 weights: 11.7 GB in float32.
REAL_MEMORY_GB = {"sd15": {"float32": 16}, "sdxl": {"float32": 48, "bfloat16": 22}}


@dataclass(frozen=True)
class Config:
    swap_repeats: int
    cold_repeats: int
    overhead_rounds: int
    overhead_steps: int
    mixed_requests: int
    mixed_steps: int
    mixed_chunks: int
    real_swap_repeats: int = 8
    real_cold_repeats: int = 3
    real_generation: bool = True


FULL = Config(
    swap_repeats=30,
    cold_repeats=7,
    overhead_rounds=7,
    overhead_steps=20,
    mixed_requests=60,
    mixed_steps=20,
    mixed_chunks=5,
)
QUICK = Config(
    swap_repeats=10,
    cold_repeats=3,
    overhead_rounds=1,
    overhead_steps=20,
    mixed_requests=8,
    mixed_steps=8,
    mixed_chunks=1,
    real_swap_repeats=4,
    real_cold_repeats=2,
    real_generation=False,
)


class Side:
    """One base model with adapter files on disk, and fresh engines / peer pipelines over it."""

    def __init__(self, size: str, folder: Path) -> None:
        self.size = size
        self.label = size.replace("-", "_")  # in metric names: ``tiny-sdxl`` -> ``tiny_sdxl``
        self.base: BaseModel = load_base_model(size)
        self.pristine = copy.deepcopy(self.base.pipeline)
        self.folder = folder
        self.files: dict[str, Path] = {}
        for index, name in enumerate(NAMES):
            self.files[name] = self.write_file(name, seed=index)

    def write_file(self, name: str, seed: int) -> Path:
        adapter = random_adapter(self.base.module_shapes, seed=seed, rank=RANK, strength=0.1)
        path = self.folder / f"{self.size}-{name}.safetensors"
        path.write_bytes(diffusers_file(adapter, self.pristine))
        return path

    def write_lycoris(self, kind: str, name: str, seed: int) -> Path:
        """A LoHa or LoKr file (kohya names) over the UNet's attention projections."""
        from adapters.formats import to_kohya

        targets = attention_targets(self.base.module_shapes, text_encoder=False)
        adapter = random_lycoris(self.base.module_shapes, kind, seed=seed, rank=RANK, targets=targets)
        path = self.folder / f"{self.size}-{kind}-{name}.safetensors"
        path.write_bytes(to_kohya(adapter))
        return path

    def engine(self) -> Engine:
        resolver = MemoryResolver()
        for name, path in self.files.items():
            resolver.add_file(name, path)
        base = copy.copy(self.base)
        base.pipeline = copy.deepcopy(self.pristine)
        return Engine(base, resolver=resolver)

    def peer(self, *, with_adapters: bool = True):
        pipeline = copy.deepcopy(self.pristine)
        if with_adapters:
            for name, path in self.files.items():
                pipeline.load_lora_weights(str(path), adapter_name=name)
        return pipeline


def _peer_swap(pipeline, blend: list[tuple[str, float]]) -> None:
    names = [name for name, _ in blend]
    pipeline.unfuse_lora()
    pipeline.set_adapters(names, [weight for _, weight in blend])
    pipeline.fuse_lora(adapter_names=names)


def swap_ms(side: Side, repeats: int) -> Metric:
    engine, peer = side.engine(), side.peer()
    for blend in (BLEND_X, BLEND_Y, BLEND_X):  # load and stack both blends once: "cached"
        engine.activate(blend)
        _peer_swap(peer, blend)
    ours, theirs = [], []
    for index in range(repeats):
        blend = BLEND_Y if index % 2 == 0 else BLEND_X
        ours.append(timed(lambda b=blend: engine.activate(b)))
        theirs.append(timed(lambda b=blend: _peer_swap(peer, b)))
    return Metric(f"swap_ms_{side.label}", median_ms(ours), median_ms(theirs), "ms", "lower")


def cold_load_ms(side: Side, repeats: int) -> Metric:
    engine, peer = side.engine(), side.peer(with_adapters=False)
    ours, theirs = [], []
    for index in range(repeats + 1):  # the first round warms both up and is dropped
        name = f"cold{index}"
        path = side.write_file(name, seed=1000 + index)
        engine.resolver.add_file(name, path)
        mine = timed(lambda n=name: engine.activate([(n, 1.0)]))
        peers = timed(lambda n=name, p=path: peer.load_lora_weights(str(p), adapter_name=n))
        peer.delete_adapters(name)
        if index:
            ours.append(mine)
            theirs.append(peers)
    return Metric(f"cold_load_ms_{side.label}", median_ms(ours), median_ms(theirs), "ms", "lower")


class LycorisPeer:
    """lycoris-lora applying its files to a copy of the pipeline: modules built from the file
    (``lycoris.modules.get_module``/``make_module``, as ``lycoris.utils.merge``), then ``merge_to``."""

    def __init__(self, side: Side) -> None:
        self.pipeline = copy.deepcopy(side.pristine)
        self.saved: dict[torch.nn.Module, torch.Tensor] = {}

    @torch.no_grad()
    def modules(self, path: Path) -> list[tuple[torch.nn.Module, object]]:
        from lycoris.modules import get_module, make_module
        from safetensors.torch import load_file

        state = load_file(str(path))
        built = []
        for prefix, root in (("lora_te", self.pipeline.text_encoder), ("lora_unet", self.pipeline.unet)):
            for child_name, child in root.named_modules():
                name = f"{prefix}.{child_name}".replace(".", "_")
                kind, params = get_module(state, name)
                if kind is not None:
                    built.append((child, make_module(kind, params, name, child)))
        return built

    @torch.no_grad()
    def apply(self, blend: list[tuple[list, float]]) -> None:
        """Restore what the previous blend touched, then merge each adapter of ``blend`` in turn."""
        for child, weight in self.saved.items():
            child.weight.data.copy_(weight)
        self.saved.clear()
        for modules, weight in blend:
            for child, module in modules:
                if child not in self.saved:
                    self.saved[child] = child.weight.data.clone()
                module.merge_to(weight)


def lycoris_cold_load_ms(side: Side, kind: str, repeats: int) -> Metric:
    engine, peer = side.engine(), LycorisPeer(side)
    ours, theirs = [], []
    for index in range(repeats + 1):  # the first round warms both up and is dropped
        name = f"{kind}-cold{index}"
        path = side.write_lycoris(kind, name, seed=2000 + index)
        engine.resolver.add_file(name, path)
        mine = timed(lambda n=name: engine.activate([(n, 1.0)]))
        peers = timed(lambda p=path: peer.apply([(peer.modules(p), 1.0)]))
        peer.apply([])
        if index:
            ours.append(mine)
            theirs.append(peers)
    return Metric(f"cold_load_ms_{side.label}_{kind}", median_ms(ours), median_ms(theirs), "ms", "lower")


def lycoris_swap_ms(side: Side, kind: str, repeats: int) -> Metric:
    paths = {name: side.write_lycoris(kind, name, seed=3000 + index) for index, name in enumerate(NAMES)}
    engine, peer = side.engine(), LycorisPeer(side)
    for name, path in paths.items():
        engine.resolver.add_file(f"{kind}-{name}", path)
    built = {name: peer.modules(path) for name, path in paths.items()}  # loaded once: "cached"
    ours_blends = [[(f"{kind}-{n}", w) for n, w in blend] for blend in (BLEND_X, BLEND_Y)]
    peer_blends = [[(built[n], w) for n, w in blend] for blend in (BLEND_X, BLEND_Y)]
    for index in (0, 1, 0):
        engine.activate(ours_blends[index])
        peer.apply(peer_blends[index])
    ours, theirs = [], []
    for index in range(repeats):
        which = 1 if index % 2 == 0 else 0
        ours.append(timed(lambda b=ours_blends[which]: engine.activate(b)))
        theirs.append(timed(lambda b=peer_blends[which]: peer.apply(b)))
    return Metric(f"swap_ms_{side.label}_{kind}", median_ms(ours), median_ms(theirs), "ms", "lower")


def blend_overhead_pct(side: Side, rounds: int, steps: int) -> Metric:
    engine = side.engine()
    peer_lora, peer_base = side.peer(), side.peer(with_adapters=False)
    names = [name for name, _ in BLEND_X]
    peer_lora.set_adapters(names, [weight for _, weight in BLEND_X])
    resolution = side.base.resolution

    def ours(blend: list[tuple[str, float]]) -> Callable[[], object]:
        engine.activate(blend)  # the swap is not part of the generation time
        return lambda: engine.generate(GenerateRequest(PROMPT, steps=steps, seed=1, adapters=blend))

    def peer(pipeline) -> Callable[[], object]:
        generator = torch.Generator().manual_seed(1)
        return lambda: pipeline(
            PROMPT, num_inference_steps=steps, height=resolution, width=resolution, generator=generator
        )

    # CPU time of this process, not wall time: other processes on a shared machine
    # then cannot tilt a few-percent comparison (both sides run on this thread).
    samples: dict[str, list[float]] = {"ours_base": [], "ours_blend": [], "peer_base": [], "peer_blend": []}
    engine.generate(GenerateRequest(PROMPT, steps=2, seed=1, adapters=BLEND_X))  # warm-up
    peer_lora(PROMPT, num_inference_steps=2, height=resolution, width=resolution)
    peer_base(PROMPT, num_inference_steps=2, height=resolution, width=resolution)
    for _ in range(rounds):
        samples["ours_base"].append(cpu_timed(ours([])))
        samples["ours_blend"].append(cpu_timed(ours(BLEND_X)))
        samples["peer_base"].append(cpu_timed(peer(peer_base)))
        samples["peer_blend"].append(cpu_timed(peer(peer_lora)))
    medians = {key: statistics.median(values) for key, values in samples.items()}
    mine = (medians["ours_blend"] / medians["ours_base"] - 1.0) * 100.0
    theirs = (medians["peer_blend"] / medians["peer_base"] - 1.0) * 100.0
    note = (
        f"CPU time; base {medians['ours_base'] * 1000:.0f} ms (loraloom), "
        f"{medians['peer_base'] * 1000:.0f} ms (peer)"
    )
    return Metric(f"blend_overhead_pct_{side.label}", mine, theirs, "pct", "lower", note)


def mixed_rps(side: Side, count: int, steps: int, chunks: int, max_batch: int = 4) -> Metric:
    """Throughput over ``count`` requests cycling through the blends, in ``chunks`` interleaved rounds."""
    resolution = side.base.resolution
    blends = [MIXED_BLENDS[index % len(MIXED_BLENDS)] for index in range(count)]
    engine = side.engine()
    for blend in MIXED_BLENDS:  # adapters loaded and blends stacked once: both sides start warm
        engine.activate(blend)
    scheduler = Scheduler(engine, max_queue=max(64, count), max_group_skips=4, max_batch=max_batch)
    peer = side.peer()
    for blend in MIXED_BLENDS:
        peer.set_adapters([n for n, _ in blend], [w for _, w in blend])

    def ours(indices: range) -> None:
        futures = [
            scheduler.submit(
                scheduler.engine.job(GenerateRequest(PROMPT, steps=steps, seed=index, adapters=blends[index]))
            )
            for index in indices
        ]
        for future in futures:
            future.result()

    def theirs(indices: range) -> None:
        for index in indices:
            blend = blends[index]
            peer.set_adapters([n for n, _ in blend], [w for _, w in blend])
            peer(
                PROMPT,
                num_inference_steps=steps,
                height=resolution,
                width=resolution,
                generator=torch.Generator().manual_seed(index),
            )

    size = -(-count // chunks)
    our_s = their_s = 0.0
    for start in range(0, count, size):
        indices = range(start, min(count, start + size))
        our_s += timed(lambda i=indices: ours(i))
        their_s += timed(lambda i=indices: theirs(i))
    scheduler.close(drain=True, timeout=10)
    note = (
        f"{count} requests, {steps} steps, {len(MIXED_BLENDS)} blends, {chunks} rounds, max_batch {max_batch}"
    )
    name = f"mixed_rps_{side.label}" + ("" if max_batch > 1 else "_unbatched")
    return Metric(name, count / our_s, count / their_s, "req/s", "higher", note)


# ---------------------------------------------------------------- real sizes


class RealModel:
    """A real-size model (``bench.realsize``) with rank-32 adapter files over kohya's modules.

    The two sides run one after the other, each with the only resident copy of the model
    (loraloom's engine, then the peer's pipeline): an SDXL copy is 7 GB in bfloat16 and its
    blend's weights 5.8 GB more, so two sides at once do not fit a 24 GB machine."""

    def __init__(self, model: str, folder: Path, dtype: torch.dtype = torch.float32) -> None:
        from bench.realsize import real_size_folder

        self.model, self.label, self.dtype = model, model, dtype
        self.model_folder = real_size_folder(model, dtype)
        self.folder = folder
        self.base: BaseModel | None = load_base_model(self.model_folder, dtype=dtype)
        self.resolution = int(self.base.resolution)
        self.targets = kohya_targets(self.base.module_shapes)
        self.files = {name: self.write_file(name, seed=index) for index, name in enumerate(NAMES)}
        self.cold: list[tuple[str, Path]] = []
        self.use: list[tuple[str, Path]] = []

    def write_file(self, name: str, seed: int) -> Path:
        assert self.base is not None
        adapter = random_adapter(
            self.base.module_shapes, seed=seed, rank=REAL_RANK, targets=self.targets, strength=0.05
        )
        path = self.folder / f"{self.model}-{name}.safetensors"
        path.write_bytes(diffusers_file(adapter, self.base.pipeline))
        return path

    def cold_files(self, count: int) -> None:
        """Write ``count`` adapter files for loads and ``count`` for first uses, never read before
        (both sides read the same ones, each its own first time): ``self.cold``, ``self.use``."""
        self.cold = [(f"cold{i}", self.write_file(f"cold{i}", seed=1000 + i)) for i in range(count)]
        self.use = [(f"use{i}", self.write_file(f"use{i}", seed=2000 + i)) for i in range(count)]

    def engine(self) -> tuple[Engine, float]:
        """A fresh engine with default settings over the base, warmed up as ``serve`` does."""
        assert self.base is not None
        resolver = MemoryResolver()
        for name, path in self.files.items():
            resolver.add_file(name, path)
        engine = Engine(self.base, resolver=resolver)
        return engine, engine.warm_up()

    def drop_base(self) -> None:
        self.base = None
        gc.collect()

    def peer(self):
        """A fresh diffusers pipeline of the model (no adapters)."""
        return load_base_model(self.model_folder, dtype=self.dtype).pipeline


@dataclass
class RealTimes:
    """One side's real-size timings (seconds, lists of repeats)."""

    swap: list[float]
    first_blend: list[float]
    cold_load: list[float]
    first_use: list[float]
    first_activation: float
    generation: float | None = None  # one default generation with a blend, estimated (see below)
    note: str = ""


def _generation_s(run: Callable[[int], object]) -> float:
    """A 20-step generation's seconds from two short runs (2 and 4 steps): fixed costs (text
    encoding, decoding) plus 20 times the step time; 20 steps at SD 1.5 size take minutes here."""
    two, four = timed(lambda: run(2)), timed(lambda: run(4))
    step = max(0.0, (four - two) / 2)
    return two - 2 * step + 20 * step


def loraloom_real(real: RealModel, config: Config) -> RealTimes:
    """loraloom's side: every real-size row on one fresh, warmed-up engine (the base restored after)."""
    engine, warm_ms = real.engine()
    first_activation = timed(lambda: engine.activate(BLEND_X))
    for blend in (BLEND_Y, BLEND_X, BLEND_Y):  # both blends loaded and (where they fit) kept
        engine.activate(blend)
    swap = [
        timed(lambda b=(BLEND_X if index % 2 == 0 else BLEND_Y): engine.activate(b))
        for index in range(config.real_swap_repeats)
    ]
    switching_mb = process_memory_mb()["VmRSS"]  # W0, the blends kept (or the scratch buffers), the adapters
    first_blend = []
    for index in range(config.real_cold_repeats + 1):
        weight = round(0.3 + 0.1 * index, 2)  # a new blend each time
        first_blend.append(timed(lambda w=weight: engine.activate([("a0", w), ("a2", 1.0 - w)])))
    cold_load, first_use = [], []
    for name, path in real.cold:
        engine.resolver.add_file(name, path)
        cold_load.append(timed(lambda n=name: engine.load(n)))
        engine.unload(name)
    for name, path in real.use:
        engine.resolver.add_file(name, path)
        first_use.append(timed(lambda n=name: engine.activate([(n, 1.0)])))
        engine.unload(name)
    generation = None
    if config.real_generation:
        engine.activate(BLEND_X)
        generation = _generation_s(
            lambda steps: engine.generate(GenerateRequest(PROMPT, steps=steps, seed=1, adapters=BLEND_X))
        )
    dtype = str(real.dtype).removeprefix("torch.")
    note = (
        f"{dtype}; warm-up {warm_ms:.0f} ms; plan cache {engine.plan_capacity_bytes >> 20} MiB; "
        f"RSS while switching {switching_mb:.0f} MB"
    )
    engine.activate([])  # the base's own tensors again
    return RealTimes(swap, first_blend[1:], cold_load[1:], first_use[1:], first_activation, generation, note)


def peer_real(real: RealModel, config: Config) -> RealTimes:
    """The peer's side: diffusers + PEFT on a fresh pipeline. A switch (and a new blend) is
    ``unfuse_lora``, ``set_adapters``, ``fuse_lora``; an adapter's load and first use are
    ``load_lora_weights`` (the adapter is active, unfused, once it returns)."""
    pipeline = real.peer()
    # PEFT warns each time a deleted adapter was the active one (every cold-load round).
    warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")

    def first() -> None:
        for name, _ in BLEND_X:
            pipeline.load_lora_weights(str(real.files[name]), adapter_name=name)
        pipeline.set_adapters([n for n, _ in BLEND_X], [w for _, w in BLEND_X])
        pipeline.fuse_lora(adapter_names=[n for n, _ in BLEND_X])

    first_activation = timed(first)
    for name, _ in BLEND_Y:
        pipeline.load_lora_weights(str(real.files[name]), adapter_name=name)
    for blend in (BLEND_Y, BLEND_X, BLEND_Y):
        _peer_swap(pipeline, blend)
    swap = [
        timed(lambda b=(BLEND_X if index % 2 == 0 else BLEND_Y): _peer_swap(pipeline, b))
        for index in range(config.real_swap_repeats)
    ]
    first_blend = []
    for index in range(config.real_cold_repeats + 1):
        weight = round(0.3 + 0.1 * index, 2)
        first_blend.append(timed(lambda w=weight: _peer_swap(pipeline, [("a0", w), ("a2", 1.0 - w)])))
    pipeline.unfuse_lora()
    cold_load = []
    for name, path in real.cold:
        cold_load.append(timed(lambda n=name, p=path: pipeline.load_lora_weights(str(p), adapter_name=n)))
        pipeline.delete_adapters(name)
    generation = None
    if config.real_generation:
        pipeline.set_adapters([n for n, _ in BLEND_X], [w for _, w in BLEND_X])
        pipeline.fuse_lora(adapter_names=[n for n, _ in BLEND_X])
        size = real.resolution

        def run(steps: int) -> None:
            generator = torch.Generator().manual_seed(1)
            pipeline(PROMPT, num_inference_steps=steps, height=size, width=size, generator=generator)

        generation = _generation_s(run)
    return RealTimes(swap, first_blend[1:], cold_load[1:], cold_load[1:], first_activation, generation)


def real_size_times(real: RealModel, config: Config) -> list[Metric]:
    """Both sides, one after the other, as metrics."""
    ours = loraloom_real(real, config)
    real.drop_base()
    theirs = peer_real(real, config)
    gc.collect()
    label = real.label
    metrics = [
        Metric(f"swap_ms_{label}", median_ms(ours.swap), median_ms(theirs.swap), "ms", "lower", ours.note),
        Metric(
            f"first_blend_ms_{label}",
            median_ms(ours.first_blend),
            median_ms(theirs.first_blend),
            "ms",
            "lower",
        ),
        Metric(
            f"cold_load_ms_{label}",
            median_ms(ours.cold_load),
            median_ms(theirs.cold_load),
            "ms",
            "lower",
            "read, validate, prepare into the adapter cache vs load_lora_weights",
        ),
        Metric(
            f"first_use_ms_{label}",
            median_ms(ours.first_use),
            median_ms(theirs.first_use),
            "ms",
            "lower",
            "loraloom: load and write it into the weights; peer: load_lora_weights (unfused)",
        ),
        Metric(
            f"first_activation_ms_{label}",
            ours.first_activation * 1000,
            theirs.first_activation * 1000,
            "ms",
            "lower",
            "a fresh server's first 2-adapter blend (loraloom after its warm-up)",
        ),
    ]
    if ours.generation and theirs.generation:
        mine = median_ms(ours.swap) / (ours.generation * 1000) * 100
        peers = median_ms(theirs.swap) / (theirs.generation * 1000) * 100
        note = (
            f"20-step generation with a blend, {real.resolution} px, estimated from 2 and 4 steps: "
            f"{ours.generation:.0f} s (loraloom, torch) / {theirs.generation:.0f} s (peer)"
        )
        metrics.append(Metric(f"swap_pct_of_generation_{label}", mine, peers, "% of gen", "lower", note))
    return metrics


RSS_SCRIPT = """
import json, sys
from bench.engine import rss_setup
print("RSS " + json.dumps(rss_setup(*sys.argv[1:])))
"""


def rss_setup(side: str, model_folder: str, dtype: str, threads: str, *files: str) -> dict[str, float]:
    """In a fresh process: load the model, apply the blend of ``files`` (weights of ``BLEND_X``;
    loraloom: an engine with default settings, warmed up; peer: diffusers ``from_pretrained``,
    ``load_lora_weights``, ``fuse_lora``), read every weight the pipeline runs with (as a first
    generation does); returns the RSS then, its peak and its anonymous part, in MB."""
    from server.models.families import family_of

    torch.set_num_threads(int(threads))
    quiet_peers()
    weights = [weight for _, weight in BLEND_X]
    names = [f"a{index}" for index in range(len(files))]
    if side == "loraloom":
        base = load_base_model(model_folder, dtype=getattr(torch, dtype))
        resolver = MemoryResolver()
        for name, path in zip(names, files, strict=True):
            resolver.add_file(name, path)
        engine = Engine(base, resolver=resolver)
        engine.warm_up()
        engine.activate(list(zip(names, weights, strict=True)))
    else:
        from server.models.loader import folder_family

        family = folder_family(Path(model_folder))
        extra = {}
        if family.pipeline_class == "StableDiffusionPipeline":
            extra = {"safety_checker": None, "requires_safety_checker": False}
        pipeline = family.pipeline_type().from_pretrained(
            model_folder, dtype=getattr(torch, dtype), local_files_only=True, **extra
        )
        for name, path in zip(names, files, strict=True):
            pipeline.load_lora_weights(path, adapter_name=name)
        pipeline.set_adapters(names, weights)
        pipeline.fuse_lora(adapter_names=names)
    # Read every weight the pipeline runs with, as its first generation would: a memory-mapped
    # weight (diffusers keeps safetensors weights mapped) is resident only once it has been read.
    runs = engine.pipeline if side == "loraloom" else pipeline
    with torch.no_grad():
        for component in family_of(runs).weight_components:
            for parameter in getattr(runs, component).parameters():
                parameter.sum()
    gc.collect()
    return process_memory_mb()


def real_rss_mb(side: RealModel) -> Metric:
    """``rss_mb_<size>_torch``: a fresh subprocess per side, one after the other."""
    found: dict[str, dict[str, float]] = {}
    files = [str(side.files[name]) for name, _ in BLEND_X]
    dtype = str(side.dtype).removeprefix("torch.")
    for who in ("loraloom", "peer"):
        args = [who, str(side.model_folder), dtype, str(torch.get_num_threads()), *files]
        found[who] = run_script(RSS_SCRIPT, args, "RSS ", f"the {who} RSS run")
    ours, theirs = found["loraloom"], found["peer"]
    note = (
        f"every weight read; anonymous {ours['RssAnon']:.0f} / {theirs['RssAnon']:.0f} MB, "
        f"peak {ours['VmHWM']:.0f} / {theirs['VmHWM']:.0f} MB (loraloom / peer)"
    )
    ours, theirs = ours["VmRSS"], theirs["VmRSS"]
    return Metric(f"rss_mb_{side.label}_torch", ours, theirs, "MB", "lower", note)


def real_size_rows(section: str, config: Config, folder: Path) -> list[Metric]:
    """Every real-size row of ``section`` (``sd15``, ``sdxl-base``) in the first dtype of
    ``REAL_MEMORY_GB`` the machine's memory allows; none when none does (it says so on stderr)."""
    from server.engine.cache import host_memory_bytes

    model = REAL_SIZES[section]
    memory = (host_memory_bytes() or 0) / (1 << 30)
    fitting = [dtype for dtype, needed in REAL_MEMORY_GB[model].items() if needed <= memory]
    if not fitting:
        needed = min(REAL_MEMORY_GB[model].values())
        print(
            f"bench engine {section}: NOT RUN: it needs about {needed} GB of memory (the model, its "
            f"blends, the adapters); this machine has {memory:.0f} GB",
            file=sys.stderr,
            flush=True,
        )
        return []
    dtype = getattr(torch, fitting[0])
    real = RealModel(model, folder, dtype)
    real.cold_files(config.real_cold_repeats + 1)
    if dtype != torch.float32:  # a half-precision generation on a CPU: an hour
        config = dataclasses.replace(config, real_generation=False)
    metrics = real_size_times(real, config)
    metrics.append(real_rss_mb(real))
    return metrics


def run(quick: bool = False, sections: frozenset[str] = frozenset(SECTIONS) - set(OPT_IN)) -> list[Metric]:
    quiet_peers()
    config = QUICK if quick else FULL
    metrics: list[Metric] = []
    with tempfile.TemporaryDirectory(prefix="loraloom-bench-") as folder:
        tiny = Side("tiny", Path(folder)) if sections & {"sd1", "mixed"} else None
        small = Side("small", Path(folder)) if sections & {"sd1", "lycoris"} else None
        if "sd1" in sections:
            metrics += [
                swap_ms(tiny, config.swap_repeats),
                swap_ms(small, config.swap_repeats),
                blend_overhead_pct(tiny, config.overhead_rounds, config.overhead_steps),
                cold_load_ms(tiny, config.cold_repeats),
                cold_load_ms(small, config.cold_repeats),
            ]
        if "lycoris" in sections:
            metrics += [lycoris_cold_load_ms(small, kind, config.cold_repeats) for kind in ("loha", "lokr")]
            metrics += [lycoris_swap_ms(small, kind, config.swap_repeats) for kind in ("loha", "lokr")]
        if "sdxl" in sections:
            sdxl = Side("tiny-sdxl", Path(folder))
            metrics += [
                swap_ms(sdxl, config.swap_repeats),
                blend_overhead_pct(sdxl, config.overhead_rounds, config.overhead_steps),
                cold_load_ms(sdxl, config.cold_repeats),
            ]
        if "mixed" in sections:
            metrics.append(mixed_rps(tiny, config.mixed_requests, config.mixed_steps, config.mixed_chunks))
            if not quick:
                metrics.append(mixed_rps(tiny, 20, config.mixed_steps, 2, max_batch=1))
        for section in OPT_IN:
            if section in sections:
                metrics += real_size_rows(section, config, Path(folder))
    return metrics
