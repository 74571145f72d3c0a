"""``python -m bench SUITE [--quick] [--json FILE] [--only SECTIONS] [--skip SECTIONS]``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

# Every module of this package except the harness's own (the real-size model cache, the GenAI peer
# package, ``bench cpu``'s served SD 1.5 rows) is a suite.
HARNESS = {"report", "realsize", "__main__", "genai", "served"}
SUITES = {
    info.name: f"bench.{info.name}"
    for info in pkgutil.iter_modules([str(Path(__file__).parent)])
    if info.name not in HARNESS and not info.name.startswith("_")
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suite", choices=sorted(SUITES), help="which suite to run")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, < 60 s)")
    parser.add_argument("--json", metavar="FILE", help="also write the metrics as JSON to FILE")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads for both sides (default: the suite's THREADS, else torch's choice)",
    )
    parser.add_argument(
        "--only",
        metavar="SECTIONS",
        help="comma-separated sections to run, of the suite's SECTIONS (default: all but its "
        "OPT_IN sections, which take minutes)",
    )
    parser.add_argument("--skip", metavar="SECTIONS", help="comma-separated sections to leave out")
    args = parser.parse_args(argv)

    from bench.report import print_table, write_json
    from server.backends.openvino_runtime import disable_telemetry

    disable_telemetry()  # before any suite imports OpenVINO: a benchmark never phones home either

    module = importlib.import_module(SUITES[args.suite])
    threads = args.threads or getattr(module, "THREADS", 0)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    sections = _sections(parser, args, getattr(module, "SECTIONS", ()), getattr(module, "OPT_IN", ()))
    metrics = module.run(quick=args.quick, **({"sections": sections} if sections is not None else {}))
    print_table(args.suite, metrics, peer=module.PEER)
    if args.json:
        write_json(args.json, args.suite, metrics, peer=module.PEER, quick=args.quick)
    return 0


def _sections(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    known: tuple[str, ...],
    opt_in: tuple[str, ...] = (),
):
    """The sections to run (``None``: the suite has none), from ``--only`` and ``--skip``; without
    ``--only``, every section but the ``opt_in`` ones (those run only when named)."""
    only, skip = _names(args.only), _names(args.skip)
    if not known:
        if only or skip:
            parser.error(f"suite {args.suite} has no sections: --only/--skip do not apply")
        return None
    unknown = sorted((only | skip) - set(known))
    if unknown:
        parser.error(f"suite {args.suite} has no section {', '.join(unknown)}: use {', '.join(known)}")
    return frozenset((only or set(known) - set(opt_in)) - skip)


def _names(text: str | None) -> set[str]:
    return {name.strip() for name in (text or "").split(",") if name.strip()}


if __name__ == "__main__":
    sys.exit(main())
