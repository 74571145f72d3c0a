"""Trainer fixtures: generated image folders, and one torch thread while training.

On a busy 2-core machine two OpenMP threads per process spin against other
processes: a 100-step run took 144 s with 2 threads and 11 s with one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from imagegen import make_folder


@pytest.fixture()
def shapes_dir(tmp_path):
    return make_folder(tmp_path / "shapes", 16, size=(40, 40))
