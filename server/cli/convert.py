"""``loraloom adapters convert``: rewrite an adapter file for a base model, offline (no server).

Imported only when the command runs: it loads the base model (torch, diffusers).
"""

from __future__ import annotations

import os
from pathlib import Path

from adapters.canonical import BaseModelRef


def convert_file(source: Path, output: Path, to: str, model: str) -> str:
    """Convert ``source`` to format ``to`` for the base ``model`` (as ``serve --model`` takes it) and
    write ``output``; returns the line to print."""
    from adapters.formats.convert import convert_adapter
    from server.models.loader import load_base_model

    base = load_base_model(model)
    adapter, data = convert_adapter(
        source,
        to,
        shapes=base.module_shapes,
        base=BaseModelRef(base.architecture),
        flat_text_encoder=not hasattr(base.pipeline.text_encoder, "text_model"),
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, output)  # a crash leaves no half-written file under the name asked for
    made_for = adapter.base.architecture if adapter.base else base.architecture
    return (
        f"wrote {output} ({to}, {adapter.kind}, {len(adapter.modules)} modules, rank "
        f"{max(adapter.ranks, default=0)}, for {made_for}; checked against {base.name})"
    )
