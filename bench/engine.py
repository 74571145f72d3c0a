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

Sections (``--only``/``--skip``): ``sd1`` (the LoRA rows on ``tiny`` and
``small``), ``lycoris``, ``mixed``, ``sdxl``.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.report import Metric, cpu_timed, median_ms, quiet_peers, timed
from server.engine import Engine, GenerateRequest, MemoryResolver
from server.engine.scheduler import Scheduler
from server.engine.synthetic import attention_targets, diffusers_file, random_adapter, random_lycoris
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
SECTIONS = ("sd1", "lycoris", "mixed", "sdxl")


@dataclass(frozen=True)
class Config:
    swap_repeats: int
    cold_repeats: int
    overhead_rounds: int
    overhead_steps: int
    mixed_requests: int
    mixed_steps: int
    mixed_chunks: int


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


def run(quick: bool = False, sections: frozenset[str] = frozenset(SECTIONS)) -> list[Metric]:
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
    return metrics
