"""Helpers of the API tests: the engine's step seam, a micro-model config, adapters for it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from server.settings import Settings


@dataclass
class StepSeam:
    """The engine's before_step seam: slows steps down, counts them, fails on demand."""

    delay_s: float = 0.0
    fail_with: BaseException | None = None
    calls: list[tuple[float, int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, index: int, total: int) -> None:
        with self.lock:
            self.calls.append((time.monotonic(), index, total))
            error = self.fail_with
        if error is not None:
            raise error
        if self.delay_s:
            time.sleep(self.delay_s)

    def steps_after(self, moment: float) -> int:
        with self.lock:
            return sum(1 for at, *_ in self.calls if at > moment)

    def reset(self) -> None:
        with self.lock:
            self.calls.clear()
        self.delay_s = 0.0
        self.fail_with = None


def micro_config(home, **overrides) -> Settings:
    values = dict(
        host="127.0.0.1",
        port=0,
        model="micro",
        backend="torch",  # the API tests are about the API; backends have their own tests
        precision="fp32",
        home=home,
        max_queue=2,
        default_steps=4,
        image_chunk_bytes=700,
        grace_s=10.0,
        log_level="WARNING",
    )
    values.update(overrides)
    return Settings.of(**values)


def adapter_bytes(shapes, *, seed: int = 1, rank: int = 4, architecture: str = "loraloom:micro") -> bytes:
    """A canonical .safetensors LoRA over the attention layers of ``shapes``."""
    from adapters.canonical import BaseModelRef
    from adapters.formats.canonical_io import save_canonical
    from server.engine.synthetic import random_adapter

    adapter = random_adapter(shapes, seed=seed, rank=rank, strength=0.5, base=BaseModelRef(architecture))
    return save_canonical(adapter)
