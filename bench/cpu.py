"""Suite ``cpu``: loraloom's fastest CPU path vs OpenVINO GenAI's Text2ImagePipeline (and, on SDXL,
vs diffusers' StableDiffusionXLPipeline + PEFT).

Both sides run in this process on the same factory models and the same adapter
files: ``tiny`` (64 px, 20 steps) and ``small`` (256 px, 5 steps), Euler, seed 0,
CFG 7.5, one prompt. GenAI loads the project's own export of each model
(``bench.genai.export``) and two random rank-8 adapters (UNet and text-encoder
attention) as kohya files with float32 alphas. loraloom runs
an engine on ``build_backend("openvino", base, "bf16")``; where that backend is
missing it falls back to ``backend="torch"`` (fp32) and every note says so.
The peer runs in its default precision (bf16 on a CPU with AVX512-BF16 or AMX).

Timings are wall-clock medians, the two sides timed in alternation (one request
each, turn about) after warm-ups, on ``--threads`` threads each (default 1: on a
shared 2-core machine a 2-thread torch pool collapses, 10-50 s for what takes 2 s
on one thread; pass ``--threads 2`` on a quiet 2-core machine).

- ``cpu_base_gen_ms_tiny`` / ``_small``: a request with no adapter. Peer: a
  pipeline built without adapters.
- ``cpu_blend_gen_ms_small``: a request with the blend a 0.7 + b 0.3 active.
  Peer: the pipeline built with both adapters (GenAI's dynamic LoRA), the blend
  as an ``AdapterConfig`` of alphas.
- ``cpu_switch_ms_small``: the added cost of alternating blends from one request
  to the next: requests go X X Y Y X X ..., so every other request switches;
  the figure is the median over pairs of (switching request - the staying
  request after it), in CPU time of this process (both sides run in it; wall
  time on a shared machine drowns a few ms in noise). loraloom's figure is at
  least its in-engine swap time (``Timings.swap_ms``), which noise can undercut.
- ``cpu_fidelity_f32_small`` / ``_bf16_small``: max pixel difference (of 255)
  of loraloom's fp32 / bf16 path from the torch fp32 engine under the blend, the
  mean in the note. Peer column: for fp32 the tolerance (2 levels); for bf16
  GenAI's own bf16 image against the same torch reference.

SDXL (section ``sdxl``, ``tiny-sdxl``: 64 px, 10 steps, two text encoders; the
adapters cover the UNet and both encoders, kohya files with SGM names for loraloom
and GenAI, diffusers files of the same adapters for diffusers) runs the rows of
``small`` with ``_tiny_sdxl`` names, plus ``cpu_{base_gen,blend_gen,switch}_ms_tiny_sdxl_diffusers``
against diffusers' own pipeline in float32 (Euler, its ``load_lora_weights``; a request
with another blend than the one before calls ``set_adapters``, unfused: PEFT's default). Where the OpenVINO
backend cannot run SDXL (building it or a one-step probe fails), the loraloom side
runs ``backend="torch"`` and every note says ``FALLBACK torch fp32``.

Each adapter must change the peer's image (max difference above 2 levels from its
base image), and the peer's image under the blend, after switching from the single
adapters, must stay within ``VOID_MEAN`` (mean, of 255) of the torch fp32 engine's,
else the notes of the adapter rows (blend, switch, fidelity) say the comparison is
void. Without ``openvino_genai`` (or if the export fails) the suite says so and
reports the other figures.

Sections (``--only``/``--skip``): ``tiny``, ``small``, ``sdxl``; opt-in: ``sd15`` (``loraloom serve``
at SD 1.5 size against a diffusers process: restart to ready, resident memory, a 512 px generation
with a blend; ``bench.served``).
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from adapters.formats import to_kohya
from bench.genai.peer import GenaiPeer, Settings, default_precision, genai_missing
from bench.report import Metric, cpu_timed, median_ms, quiet_peers, timed
from server.backends.select import build_backend
from server.engine import Engine, GenerateRequest, MemoryResolver
from server.engine.synthetic import diffusers_file, random_adapter
from server.models.loader import BaseModel, load_base_model

PEER = "OpenVINO GenAI (Text2ImagePipeline); *_diffusers rows: diffusers + PEFT"
THREADS = 1
PROMPT = "a watercolor fox in a snowy forest"
SEED = 0
GUIDANCE = 7.5
SAMPLER = "euler"
SECTIONS = ("tiny", "small", "sdxl", "sd15")
OPT_IN = ("sd15",)  # SD 1.5 size through `loraloom serve` (bench.served): many minutes
MODELS = {"tiny": "tiny", "small": "small", "sdxl": "tiny-sdxl"}  # section -> model
STEPS = {"tiny": 20, "small": 5, "tiny-sdxl": 10}
ADAPTER_ROWS = ("small", "tiny-sdxl")  # models with the blend, switch and fidelity rows
DIFFUSERS_PEER = ("tiny-sdxl",)  # models also compared with diffusers + PEFT
RANK = 8
ADAPTERS = ("a", "b")
BLEND_X = [("a", 0.7), ("b", 0.3)]
BLEND_Y = [("a", 0.3), ("b", 0.7)]
F32_TOLERANCE = 2.0
MIN_EFFECT = 2.0  # an adapter must move the peer's image by more than this (max, of 255)
VOID_MEAN = 4.0  # the peer's blend image may differ from torch fp32 by this much on average (bf16: ~1.2)
BACKEND = "openvino"


@dataclass(frozen=True)
class Config:
    base_rounds: int
    blend_rounds: int
    switch_requests: int  # a multiple of 4: X X Y Y


FULL = Config(base_rounds=9, blend_rounds=9, switch_requests=40)
QUICK = Config(base_rounds=2, blend_rounds=2, switch_requests=8)


def _say(text: str) -> None:
    print(f"[bench cpu] {text}", file=sys.stderr, flush=True)


class Model:
    """A base model, its adapter files, and fresh engines over private copies of it."""

    def __init__(self, size: str, folder: Path) -> None:
        self.size = size
        self.label = size.replace("-", "_")  # in metric names
        self.base: BaseModel = load_base_model(size)
        self.pristine = copy.deepcopy(self.base.pipeline)
        self.settings = Settings(PROMPT, self.base.resolution, STEPS[size], GUIDANCE, SEED)
        self.files: dict[str, Path] = {}
        self.diffusers_files: dict[str, Path] = {}  # the same adapters as diffusers' own files
        for index, name in enumerate(ADAPTERS):
            adapter = random_adapter(self.base.module_shapes, seed=index, rank=RANK, strength=0.1)
            path = folder / f"{size}-{name}.safetensors"
            path.write_bytes(to_kohya(adapter))  # alpha is an F32 scalar: what GenAI reads
            self.files[name] = path
            if size in DIFFUSERS_PEER:
                path = folder / f"{size}-{name}-diffusers.safetensors"
                path.write_bytes(diffusers_file(adapter, self.pristine))
                self.diffusers_files[name] = path

    def request(self, blend: list[tuple[str, float]]) -> GenerateRequest:
        s = self.settings
        return GenerateRequest(
            s.prompt,
            width=s.size,
            height=s.size,
            steps=s.steps,
            guidance_scale=s.guidance_scale,
            seed=s.seed,
            sampler=SAMPLER,
            adapters=blend,
        )

    def engine(self, backend: str, precision: str) -> tuple[Engine, str]:
        """An engine on ``backend`` at ``precision``, or torch fp32 when that cannot be built (label says)."""
        resolver = MemoryResolver()
        for name, path in self.files.items():
            resolver.add_file(name, path)
        base = copy.copy(self.base)
        base.pipeline = copy.deepcopy(self.pristine)
        if backend == "torch":
            return Engine(base, resolver=resolver), "torch fp32"
        try:
            engine = Engine(base, resolver=resolver, backend=build_backend(backend, base, precision))
            engine.generate(replace(self.request([]), steps=1))  # a family the backend lacks fails here
        except Exception as error:  # whatever the backend lacks, the row runs on torch and says so
            base.pipeline = copy.deepcopy(self.pristine)
            _say(f"{self.size}: {backend} {precision} fails ({type(error).__name__}: {error}); torch fp32")
            return Engine(base, resolver=resolver), "FALLBACK torch fp32"
        return engine, engine.backend_name  # the precision it runs: bf16 falls back to fp32 without BF16


def _image(engine: Engine, model: Model, blend: list[tuple[str, float]]) -> np.ndarray:
    return np.asarray(engine.generate(model.request(blend)).images[0], dtype=np.float32)


def _diff(first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    delta = np.abs(first.astype(np.float32) - second.astype(np.float32))
    return float(delta.max()), float(delta.mean())


def _alternate(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms of each call, timed turn about after one warm-up each."""
    for call in calls.values():
        call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            samples[name].append(timed(call))
    return {name: median_ms(values) for name, values in samples.items()}


class DiffusersPeer:
    """diffusers' own pipeline on a copy of the model, Euler, float32: ``base`` without adapters,
    ``lora`` with every adapter loaded (``load_lora_weights``); a request whose blend differs from
    the one before calls ``set_adapters`` (unfused: PEFT's default)."""

    precision = "fp32"

    def __init__(self, pipeline, files: Mapping[str, Path]) -> None:
        from diffusers import EulerDiscreteScheduler

        self.base = copy.deepcopy(pipeline)
        self.base.scheduler = EulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        self.lora = copy.deepcopy(self.base)
        for name, path in files.items():
            self.lora.load_lora_weights(str(path), adapter_name=name)
        self.active: list[tuple[str, float]] | None = None

    def generate(self, settings: Settings, blend: Sequence[tuple[str, float]] | None = None) -> np.ndarray:
        pipeline = self.base
        if blend is not None:
            pipeline = self.lora
            if list(blend) != self.active:
                pipeline.set_adapters([name for name, _ in blend], [weight for _, weight in blend])
                self.active = list(blend)
        image = pipeline(
            settings.prompt,
            width=settings.size,
            height=settings.size,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            generator=torch.Generator().manual_seed(settings.seed),
        ).images[0]
        return np.asarray(image)


@dataclass
class Peer:
    """A peer on one model (GenAI, or diffusers with ``suffix="_diffusers"``), or why it could not run."""

    name: str
    runner: GenaiPeer | DiffusersPeer | None
    reason: str = ""
    void: str = ""  # set when an adapter does not change the peer's image, or its blend image is wrong
    suffix: str = ""  # after the metric names: the suite's main peer (GenAI) has none


def _genai_peer(model: Model, threads: int, reference: np.ndarray) -> Peer:
    missing = genai_missing()
    if missing:
        return Peer("GenAI", None, missing)
    from bench.genai.export import export_for_genai

    try:
        exported = export_for_genai(model.base)
        _say(f"{model.size}: GenAI folder {'cached' if exported.cached else 'exported'} at {exported.path}")
        peer = Peer("GenAI", GenaiPeer(exported.path, model.files, threads=threads))
        peer.void = _void(model, peer, reference)
    except Exception as error:  # the peer failing must not take loraloom's figures down with it
        return Peer(
            "GenAI", None, f"GenAI could not run the {model.size} model: {type(error).__name__}: {error}"
        )
    return peer


def _void(model: Model, peer: Peer, reference: np.ndarray) -> str:
    """Why the peer's adapter figures do not compare (empty: they do): an adapter that does not
    move its image, or its image under the blend, after switching from each adapter alone, far
    from the torch fp32 engine's."""
    assert peer.runner is not None
    base = peer.runner.generate(model.settings)
    weak = []
    for name in ADAPTERS:
        moved_by = _diff(peer.runner.generate(model.settings, [(name, 1.0)]), base)[0]
        _say(f"{model.size}: adapter {name} moves the {peer.name} image by {moved_by:.0f}/255 (max)")
        if moved_by <= MIN_EFFECT:
            weak.append(name)
    worst, mean = _diff(peer.runner.generate(model.settings, BLEND_X), reference)
    _say(
        f"{model.size}: the {peer.name} blend image after switching: {worst:.0f} / {mean:.2f} from torch fp32"
    )
    reasons = [f"adapter(s) {', '.join(weak)} do not change the {peer.name} image"] if weak else []
    if mean > VOID_MEAN:
        reasons.append(
            f"the {peer.name} image under the blend after a switch is {worst:.0f} / {mean:.1f} (max / mean) "
            "from torch fp32"
        )
    return "VOID: " + "; ".join(reasons) if reasons else ""


def _note(label: str, peer: Peer, extra: str = "", *, adapters: bool = True) -> str:
    assert peer.runner is not None
    parts = [f"{label} vs {peer.name} {peer.runner.precision}", extra, peer.void if adapters else ""]
    return "; ".join(part for part in parts if part)


def base_gen_ms(model: Model, engine: Engine, label: str, peer: Peer, rounds: int) -> Metric:
    assert peer.runner is not None
    runner = peer.runner
    medians = _alternate(
        {
            "ours": lambda: engine.generate(model.request([])),
            "theirs": lambda: runner.generate(model.settings),
        },
        rounds,
    )
    s = model.settings
    note = _note(label, peer, f"{s.size} px {s.steps} steps", adapters=False)
    name = f"cpu_base_gen_ms_{model.label}{peer.suffix}"
    return Metric(name, medians["ours"], medians["theirs"], "ms", "lower", note)


def blend_gen_ms(model: Model, engine: Engine, label: str, peer: Peer, rounds: int) -> Metric:
    assert peer.runner is not None
    runner = peer.runner
    medians = _alternate(
        {
            "ours": lambda: engine.generate(model.request(BLEND_X)),
            "theirs": lambda: runner.generate(model.settings, BLEND_X),
        },
        rounds,
    )
    note = _note(label, peer, "a 0.7 + b 0.3")
    name = f"cpu_blend_gen_ms_{model.label}{peer.suffix}"
    return Metric(name, medians["ours"], medians["theirs"], "ms", "lower", note)


def switch_ms(model: Model, engine: Engine, label: str, peer: Peer, requests: int) -> Metric:
    assert peer.runner is not None
    runner = peer.runner
    order = [BLEND_X if (index // 2) % 2 == 0 else BLEND_Y for index in range(requests)]
    engine.generate(model.request(BLEND_Y))  # warm both blends; the first timed request then switches
    engine.generate(model.request(BLEND_X))
    engine.generate(model.request(BLEND_Y))
    runner.generate(model.settings, BLEND_X)
    runner.generate(model.settings, BLEND_Y)
    ours: list[float] = []
    theirs: list[float] = []
    swaps: list[float] = []
    for blend in order:
        request = model.request(blend)
        started = time.process_time()
        result = engine.generate(request)
        ours.append(time.process_time() - started)
        swaps.append(result.timings.swap_ms)
        theirs.append(cpu_timed(lambda b=blend: runner.generate(model.settings, b)))
    # Even positions switch blend, odd ones repeat the one before: pair each switch with the stay after it.
    our_added = statistics.median(ours[i] - ours[i + 1] for i in range(0, requests, 2)) * 1000.0
    their_added = statistics.median(theirs[i] - theirs[i + 1] for i in range(0, requests, 2)) * 1000.0
    in_engine = statistics.median(swaps[0::2])
    if any(swaps[1::2]):
        raise RuntimeError("a repeated blend was swapped again: the switch measurement is broken")
    note = _note(label, peer, f"CPU time, {requests} req; ours: diff {our_added:.1f}, swap {in_engine:.2f}")
    name = f"cpu_switch_ms_{model.label}{peer.suffix}"
    return Metric(name, max(our_added, in_engine), their_added, "ms", "lower", note)


def fidelity(
    model: Model, reference: np.ndarray, ours: np.ndarray, label: str, precision: str, peer: Peer
) -> Metric:
    worst, mean = _diff(ours, reference)
    note = f"{label}; mean {mean:.2f}"
    if precision == "fp32":
        note += "; peer: tolerance"
        return Metric(f"cpu_fidelity_f32_{model.label}", worst, F32_TOLERANCE, "/255", "lower", note)
    if peer.runner is None:
        note += "; peer: fp32 tolerance (GenAI not run)"
        return Metric(f"cpu_fidelity_bf16_{model.label}", worst, F32_TOLERANCE, "/255", "lower", note)
    their_worst, their_mean = _diff(peer.runner.generate(model.settings, BLEND_X), reference)
    note += f"; peer: GenAI {peer.runner.precision}, mean {their_mean:.2f}"
    note = "; ".join(part for part in (note, peer.void) if part)
    return Metric(f"cpu_fidelity_bf16_{model.label}", worst, their_worst, "/255", "lower", note)


def _compare(model: Model, engine: Engine, label: str, peer: Peer, config: Config) -> list[Metric]:
    """The timed rows of one peer on one model: base generation, and on ``ADAPTER_ROWS`` the blend ones."""
    if peer.runner is None:
        _say(f"{model.size}: PEER NOT RUN ({peer.name}): {peer.reason}")
        return []
    metrics = [base_gen_ms(model, engine, label, peer, config.base_rounds)]
    if model.size in ADAPTER_ROWS:
        metrics.append(blend_gen_ms(model, engine, label, peer, config.blend_rounds))
        metrics.append(switch_ms(model, engine, label, peer, config.switch_requests))
    return metrics


def run(quick: bool = False, sections: frozenset[str] = frozenset(SECTIONS) - set(OPT_IN)) -> list[Metric]:
    quiet_peers()
    config = QUICK if quick else FULL
    threads = torch.get_num_threads()
    metrics: list[Metric] = []
    with tempfile.TemporaryDirectory(prefix="loraloom-bench-cpu-") as folder:
        for section in (section for section in SECTIONS if section in sections):
            if section in OPT_IN:
                from bench.served import sd15_rows

                metrics += sd15_rows(threads)
                continue
            model = Model(MODELS[section], Path(folder))
            reference_engine, _ = model.engine("torch", "fp32")
            reference = _image(reference_engine, model, BLEND_X)  # the blend on the torch fp32 engine
            peer = _genai_peer(model, threads, reference)
            engine, label = model.engine(BACKEND, "bf16")
            _say(f"{model.size}: loraloom path {label}; GenAI default precision {_precision_or_none()}")
            metrics += _compare(model, engine, label, peer, config)
            if model.size in DIFFUSERS_PEER:
                diffusers = Peer(
                    "diffusers", DiffusersPeer(model.pristine, model.diffusers_files), suffix="_diffusers"
                )
                diffusers.void = _void(model, diffusers, reference)
                metrics += _compare(model, engine, label, diffusers, config)
            if model.size not in ADAPTER_ROWS:
                continue
            f32_engine, f32_label = model.engine(BACKEND, "fp32")
            f32_image = _image(f32_engine, model, BLEND_X)
            metrics.append(fidelity(model, reference, f32_image, f32_label, "fp32", peer))
            metrics.append(fidelity(model, reference, _image(engine, model, BLEND_X), label, "bf16", peer))
    return metrics


def _precision_or_none() -> str:
    try:
        return default_precision()
    except ImportError:
        return "n/a"
