"""The name (one of ``server.engine.samplers.SAMPLERS``) of a base model's own scheduler.

A request that asks for the ``default`` sampler runs the base model's own scheduler; the
response names it as a client would ask for it ("dpmpp_2m", "euler", ...), so the parameters
say what ran and still reproduce the image when sent back. A name is given only when it
builds exactly the scheduler ``default`` builds (same class, same config): anything else
(another solver order, a scheduler no name covers) stays ``default``.
"""

from __future__ import annotations

from typing import Any

from server.engine.samplers import DEFAULT, SAMPLERS, make_sampler


def sampler_name(base_scheduler: Any) -> str:
    """The sampler name that makes the same scheduler as ``default`` on this base, else ``default``.

    When several do (``dpmpp_2m`` on a base whose scheduler already uses Karras sigmas builds
    the same scheduler as ``dpmpp_2m_karras``), the one whose settings say the most wins.
    """
    own = make_sampler(DEFAULT, base_scheduler)
    matches = [
        name
        for name, (class_name, _overrides) in SAMPLERS.items()
        if class_name == type(own).__name__ and _same(make_sampler(name, base_scheduler), own)
    ]
    if not matches:
        return DEFAULT
    return max(matches, key=lambda name: len(SAMPLERS[name][1]))


def _same(scheduler: Any, other: Any) -> bool:
    return type(scheduler) is type(other) and dict(scheduler.config) == dict(other.config)
