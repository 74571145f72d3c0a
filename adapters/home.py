"""Where loraloom keeps its data: one folder (LORALOOM_HOME) for the store, caches and engines."""

from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    """``$LORALOOM_HOME`` or the platform's user data directory."""
    override = os.environ.get("LORALOOM_HOME")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_path

    return user_data_path("loraloom", appauthor=False)


def cache_dir() -> Path:
    folder = data_home() / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
