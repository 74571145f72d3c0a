"""Real-size base models for benchmarks: SD 1.5 and SDXL base 1.0 topologies with seeded random weights.

``server.models.factory.build_real_size`` builds them from the shipped component
configs (minutes, gigabytes); this module saves each once as a diffusers folder
under the data folder's cache (``<LORALOOM_HOME>/cache/bench-models``) and loads
it from there afterwards, through the same loader ``loraloom serve`` uses. Never
used by tests.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from adapters.home import cache_dir

SEED = 0


def folder_of(name: str, dtype: torch.dtype = torch.float32) -> Path:
    """Where the real-size model ``name`` (``sd15``, ``sdxl``) in ``dtype`` is cached."""
    return cache_dir() / "bench-models" / f"{name}-seed{SEED}-{str(dtype).removeprefix('torch.')}"


def real_size_folder(name: str, dtype: torch.dtype = torch.float32) -> Path:
    """The cached diffusers folder of ``name``, built and saved on first use."""
    root = folder_of(name, dtype)
    if (root / "model_index.json").is_file():
        return root
    from server.models.factory import build_real_size

    print(f"building the real-size {name} model ({dtype}) once, into {root} ...", flush=True)
    pipeline = build_real_size(name, seed=SEED, dtype=dtype)
    staging = root.with_name(f"{root.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(str(staging), safe_serialization=True)
    del pipeline
    try:
        staging.rename(root)
    except OSError:  # another process finished first; its folder is complete
        shutil.rmtree(staging, ignore_errors=True)
    return root


def load_real_size(name: str, dtype: torch.dtype = torch.float32):
    """A ``BaseModel`` of the real-size ``name`` (built and cached on first use)."""
    from server.models.loader import load_base_model

    return load_base_model(real_size_folder(name, dtype), dtype=dtype)
