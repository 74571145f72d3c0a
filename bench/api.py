"""Suite ``api``: what the gRPC layer adds on top of the engine.

A server (``server.api.app.ServerThread``, tiny model, 127.0.0.1:0) runs in this
process; the same 20-step request (fixed seed, PNG) is timed end to end through
``server.client.Client`` over loopback and directly through the server's own
engine (``Engine.generate``), interleaved so a busy CPU slows both alike.

- ``grpc_latency_ms_tiny``: median end-to-end latency over gRPC (loraloom) vs
  in-process (peer). Two different requests, so on a busy CPU this is noisy.
- ``grpc_overhead_ms_tiny``: what the API adds to one request: its end-to-end
  latency minus the time the engine itself reports for that same request
  (queue, adapter load, swap, encode, denoise, decode); the median (loraloom)
  vs the budget the issue allows, 5 % of the in-process time plus 5 ms (peer).
  Measuring both on the same request keeps CPU noise out. A ratio >= 1 means
  within budget.

``python -m bench api [--quick] [--json FILE]`` (or ``python -m bench.api``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.report import Metric, median_ms, print_table, timed, write_json

PEER = "the engine in-process"
PROMPT = "a watercolor fox in a snowy forest"
STEPS = 20
SEED = 7


def run(quick: bool = False) -> list[Metric]:
    from server.api.app import ServerThread
    from server.client import Client
    from server.engine import GenerateRequest
    from server.settings import Settings

    rounds = 3 if quick else 9
    with tempfile.TemporaryDirectory() as home:
        config = Settings.of(port=0, model="tiny", home=Path(home), log_level="WARNING")
        with ServerThread(config) as running, Client(running.address, timeout=600) as client:
            engine = running.server.service.engine
            request = GenerateRequest(prompt=PROMPT, steps=STEPS, seed=SEED)
            over_grpc: list[float] = []
            in_process: list[float] = []
            added: list[float] = []
            client.generate(PROMPT, steps=STEPS, seed=SEED)  # warm both paths
            engine.generate(request)
            for _ in range(rounds):
                started = time.perf_counter()
                result = client.generate(PROMPT, steps=STEPS, seed=SEED)
                over_grpc.append(time.perf_counter() - started)
                added.append(over_grpc[-1] - result.timing.total_ms / 1000.0)
                in_process.append(timed(lambda: engine.generate(request)))
    grpc_ms, local_ms = median_ms(over_grpc), median_ms(in_process)
    overhead = median_ms(added)
    budget = 0.05 * local_ms + 5.0
    return [
        Metric("grpc_latency_ms_tiny", grpc_ms, local_ms, "ms", "lower", f"{STEPS} steps, {rounds} rounds"),
        Metric("grpc_overhead_ms_tiny", overhead, budget, "ms", "lower", "peer column: the allowed budget"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--json", metavar="FILE", help="also write the metrics as JSON to FILE")
    args = parser.parse_args(argv)
    metrics = run(quick=args.quick)
    print_table("api", metrics, peer=PEER)
    if args.json:
        write_json(args.json, "api", metrics, peer=PEER, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
