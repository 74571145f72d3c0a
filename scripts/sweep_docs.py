"""Regenerate the README's blend picture, ``docs/sweep-striped-outlined.png``:

    .venv/bin/python scripts/sweep_docs.py [--out docs/sweep-striped-outlined.png]

Starts a server on the built-in ``toy`` model (torch backend in float32, so the
picture is the same on every CPU; a throwaway store) on 127.0.0.1:0, uploads
the two style adapters that ship in ``server/models/data/toy-styles/``, and runs
``loraloom sweep`` against it: rows ``striped`` 0-1, columns ``outlined`` 0-1,
one seed, cells enlarged 2x. The sheet is then reduced to a 96-color palette
(mean error 3-4 of 255 per channel) so the committed file stays under 100 KB;
``loraloom sweep`` itself writes the exact pixels. About a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STYLES = ROOT / "server" / "models" / "data" / "toy-styles"
PROMPT = "a large red circle on a white background"
SEED = 3
WEIGHTS = "0,0.25,0.5,0.75,1"
SCALE = 2
PALETTE = 96


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "sweep-striped-outlined.png")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()

    from server.api.app import ServerThread
    from server.cli.main import app
    from server.client import Client
    from server.settings import Settings

    with tempfile.TemporaryDirectory(prefix="loraloom-sweep-") as home:
        config = Settings.of(
            host="127.0.0.1", port=0, model="toy", backend="torch", home=Path(home), log_level="WARNING"
        )
        with ServerThread(config) as running:
            with Client(running.address, timeout=60) as client:
                for style in ("striped", "outlined"):
                    client.upload_adapter(STYLES / f"{style}.safetensors", style)
            argv = ["sweep", args.prompt, "--adapter", "striped", "--adapter", "outlined"]
            argv += ["--weights", WEIGHTS, "--seed", str(args.seed), "--scale", str(SCALE)]
            argv += ["--server", running.address, "--output", str(args.out)]
            app(argv, standalone_mode=False)
    from PIL import Image

    with Image.open(args.out) as sheet:
        reduced = sheet.convert("RGB").quantize(
            PALETTE, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    reduced.save(args.out, optimize=True)
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
