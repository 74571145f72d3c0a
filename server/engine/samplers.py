"""Sampler names a request may ask for, mapped to diffusers schedulers built from the base's config.

Every request gets a fresh scheduler instance (schedulers keep per-run state),
configured from the base model's own scheduler config (its noise schedule).
"""

from __future__ import annotations

from typing import Any

from adapters.errors import InvalidArgument

# name -> (diffusers class name, config overrides)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DEFAULT = "default"


def sampler_names() -> tuple[str, ...]:
    return (DEFAULT, *SAMPLERS)


def check_sampler(name: str) -> str:
    name = (name or DEFAULT).strip().lower()
    if name != DEFAULT and name not in SAMPLERS:
        raise InvalidArgument(f"unknown scheduler {name!r}; choose one of {', '.join(sampler_names())}")
    return name


def make_sampler(name: str, base_scheduler: Any) -> Any:
    """A fresh scheduler named ``name`` (``default``: the base model's own) on the base's schedule."""
    import diffusers

    name = check_sampler(name)
    if name == DEFAULT:
        return type(base_scheduler).from_config(base_scheduler.config)
    class_name, overrides = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(base_scheduler.config, **overrides)
