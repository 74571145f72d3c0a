"""``bench cpu`` section ``sd15`` (opt-in): ``loraloom serve`` at SD 1.5 size on its default backend,
as an operator runs it, against a diffusers + PEFT process doing the same work.

The model is ``bench.realsize``'s SD 1.5 (exact configs, seeded random weights, float32, built
once). Two rank-32 diffusers-format LoRA files over kohya's modules make the blend (0.7 + 0.3).
Each side is its own process, one after the other (never two SD 1.5 processes at once):

- loraloom: ``loraloom serve --model <folder>`` with defaults (OpenVINO bf16 where the CPU has
  native bf16) and a fresh data folder, started twice. The first start converts and compiles
  everything; the second (a restart) finds the converted IR and the compiled models in the
  cache. Its client uploads both files and asks for a 512 px generation with the blend.
- peer: a Python process that builds ``StableDiffusionPipeline.from_pretrained`` (float32),
  ``load_lora_weights`` twice, ``set_adapters``, ``fuse_lora`` and generates the same way.

Rows:

- ``cpu_ready_s_sd15``: restart to ready. loraloom: from process start to a SERVING health
  check, caches warm; peer: from process start to the pipeline with the blend fused. The
  first start (nothing cached) is in the note.
- ``rss_mb_sd15_openvino`` (the backend's name as ``loraloom info`` shows it): the server's
  resident memory after the generation with the blend (``VmRSS``; anonymous and file-backed
  parts and the peak in the note); peer: the diffusers process's, after its generation.
- ``cpu_blend_gen_s_sd15``: one 20-step 512 px generation with the blend, estimated from a second
  2-step and a 4-step request (fixed costs plus 20 step times: 20 steps take minutes on 2 cores).
- ``cpu_first_request_s_sd15``: the first 2-step request once ready (what is left of the one-time
  costs: loraloom's first write of the blend and first decode at this size; torch's first run).

OpenVINO GenAI is not a peer here: its SD 1.5 pipeline needs the model exported in its own
layout (``bench.genai.export`` does that for the small models, minutes and gigabytes more here).
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.report import Metric, process_memory_mb, run_script

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on (127\.0\.0\.1:\d+)")
BLEND = [("a0", 0.7), ("a1", 0.3)]
PROMPT = "a watercolor fox in a snowy forest"
SIZE = 512
START_TIMEOUT_S = 1800.0


def adapter_files(folder: Path) -> list[Path]:
    """Two rank-32 diffusers-format LoRA files over SD 1.5's kohya modules (shapes from a
    weightless ``meta`` build: no model is loaded for them)."""
    from server.engine.synthetic import diffusers_file, kohya_targets, random_adapter
    from server.models.factory import build_real_size
    from server.models.shapes import module_shapes

    pipeline = build_real_size("sd15", device="meta")
    shapes = module_shapes(pipeline)
    targets = kohya_targets(shapes)
    paths = []
    for index, (name, _) in enumerate(BLEND):
        adapter = random_adapter(shapes, seed=index, rank=32, targets=targets, strength=0.05)
        path = folder / f"{name}.safetensors"
        path.write_bytes(diffusers_file(adapter, pipeline))
        paths.append(path)
    return paths


class Server:
    """A ``loraloom serve`` process; its log is read by a thread (the address comes from it)."""

    def __init__(self, model: Path, home: Path) -> None:
        """Defaults as an operator starts it (its own thread choice)."""
        env = {**os.environ, "LORALOOM_HOME": str(home), "PYTHONPATH": str(ROOT)}
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli.main", "serve", "--port", "0", "--model", str(model)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            self._lines.put(line)

    def ready(self) -> tuple[str, float]:
        """(address, seconds from process start to SERVING)."""
        from server.client import Client

        deadline = time.monotonic() + START_TIMEOUT_S
        address = None
        while address is None:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("loraloom serve did not start:\n" + "".join(self.log[-40:]))
            try:
                match = LISTENING.search(self._lines.get(timeout=1))
            except queue.Empty:
                continue
            address = match.group(1) if match else None
        with Client(address, timeout=60) as client:
            client.wait_ready(START_TIMEOUT_S)
        return address, time.perf_counter() - self.started

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# The requests each side runs once ready: the first pays what is left of the one-time costs (the
# blend's first write, the first decode at this size); 20 steps are estimated from the other two.
RUNS = (("first", 2), ("again", 2), ("long", 4))


def _estimate_20(timings: dict[str, float]) -> float:
    """A 20-step request's seconds from a warm 2- and 4-step one (fixed costs plus 20 steps)."""
    two, four = timings["again"], timings["long"]
    step = max(0.0, (four - two) / 2)
    return two - 2 * step + 20 * step


def loraloom_side(model: Path, files: list[Path]) -> dict[str, object]:
    """Start, restart, generate; the figures of the loraloom side."""
    from server.client import Client

    found: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="loraloom-bench-home-") as home:
        for start in ("first", "restart"):
            server = Server(model, Path(home))
            try:
                address, seconds = server.ready()
                found[f"{start}_ready_s"] = seconds
                print(f"bench cpu sd15: loraloom {start} start ready in {seconds:.0f} s", file=sys.stderr)
                if start == "first":
                    continue
                with Client(address, timeout=1800) as client:
                    for path, (name, _) in zip(files, BLEND, strict=True):
                        client.upload_adapter(path, name)
                    adapters = [f"{name}:{weight}" for name, weight in BLEND]
                    timings = {}
                    for label, steps in RUNS:
                        began = time.perf_counter()
                        client.generate(
                            PROMPT,
                            adapters=adapters,
                            steps=steps,
                            seed=1,
                            width=SIZE,
                            height=SIZE,
                        )
                        timings[label] = time.perf_counter() - began
                    found["timings"] = timings
                    info = client.server_info()
                    found["backend"] = f"{info.backend} {info.precision}".strip()
                found["memory"] = process_memory_mb(server.process.pid)
            finally:
                server.stop()
    return found


PEER_SCRIPT = """
import json, sys, time
started = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[2]))
from diffusers import StableDiffusionPipeline
model, files = sys.argv[1], sys.argv[3:]
names, weights = ["a0", "a1"], [0.7, 0.3]
pipeline = StableDiffusionPipeline.from_pretrained(
    model, torch_dtype=torch.float32, local_files_only=True, safety_checker=None,
    requires_safety_checker=False,
)
pipeline.set_progress_bar_config(disable=True)
for name, path in zip(names, files):
    pipeline.load_lora_weights(path, adapter_name=name)
pipeline.set_adapters(names, weights)
pipeline.fuse_lora(adapter_names=names)
ready = time.perf_counter() - started
timings = {}
for label, steps in RUNS:
    began = time.perf_counter()
    generator = torch.Generator().manual_seed(1)
    pipeline(PROMPT, num_inference_steps=steps, height=SIZE, width=SIZE, generator=generator)
    timings[label] = time.perf_counter() - began
from bench.report import process_memory_mb
memory = process_memory_mb()
print("PEER " + json.dumps({"ready_s": ready, "timings": timings, "memory": memory}))
"""


def peer_side(model: Path, files: list[Path], threads: int) -> dict[str, object]:
    script = f"PROMPT = {PROMPT!r}\nSIZE = {SIZE}\nRUNS = {RUNS!r}\n" + PEER_SCRIPT
    args = [str(model), str(threads), *map(str, files)]
    return run_script(script, args, "PEER ", "the diffusers process")


def sd15_rows(threads: int) -> list[Metric]:
    from bench.realsize import real_size_folder

    model = real_size_folder("sd15")
    with tempfile.TemporaryDirectory(prefix="loraloom-bench-") as folder:
        files = adapter_files(Path(folder))
        ours = loraloom_side(model, files)
        theirs = peer_side(model, files, threads)
    backend = str(ours.get("backend", "openvino")).split(" ")[0]
    mine, peers = ours["memory"], theirs["memory"]
    memory_note = (
        f"after a {SIZE} px generation with a 2-adapter blend; anonymous {mine['RssAnon']:.0f} / "
        f"{peers['RssAnon']:.0f} MB, file-backed {mine['RssFile']:.0f} / {peers['RssFile']:.0f} MB, "
        f"peak {mine['VmHWM']:.0f} / {peers['VmHWM']:.0f} MB "
        f"(loraloom {ours.get('backend')} / diffusers fp32)"
    )
    return [
        Metric(
            "cpu_ready_s_sd15",
            float(ours["restart_ready_s"]),
            float(theirs["ready_s"]),
            "s",
            "lower",
            f"restart with warm caches; first start (nothing cached): {ours['first_ready_s']:.0f} s",
        ),
        Metric(f"rss_mb_sd15_{backend}", mine["VmRSS"], peers["VmRSS"], "MB", "lower", memory_note),
        Metric(
            "cpu_blend_gen_s_sd15",
            _estimate_20(ours["timings"]),
            _estimate_20(theirs["timings"]),
            "s",
            "lower",
            f"20 steps at {SIZE} px with the blend, estimated from a second 2-step and a 4-step "
            f"request; loraloom {ours.get('backend')} vs diffusers fp32, {threads} thread(s)",
        ),
        Metric(
            "cpu_first_request_s_sd15",
            ours["timings"]["first"],
            theirs["timings"]["first"],
            "s",
            "lower",
            f"the first request once ready (2 steps, {SIZE} px, the blend: loraloom's includes its "
            f"upload's first load and write); the same request again: {ours['timings']['again']:.1f} / "
            f"{theirs['timings']['again']:.1f} s",
        ),
    ]
