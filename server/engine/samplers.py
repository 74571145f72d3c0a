"""Sampler and schedule names a request may ask for, mapped to diffusers schedulers built from the
base's config.

Every request gets a fresh scheduler instance (schedulers keep per-run state),
configured from the base model's own scheduler config (its noise schedule). The
schedule (the sigmas the sampler walks) is chosen apart from the sampler, as in
ComfyUI and A1111 >= 1.9, through diffusers' scheduler options: ``karras``
(``use_karras_sigmas``), ``exponential`` (``use_exponential_sigmas``), ``beta``
(``use_beta_sigmas``) and ``sgm_uniform`` (``timestep_spacing="trailing"``).
"""

from __future__ import annotations

import inspect
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

# schedule -> the scheduler option that selects it, and its value
SCHEDULES: dict[str, tuple[str, Any]] = {
    "karras": ("use_karras_sigmas", True),
    "exponential": ("use_exponential_sigmas", True),
    "beta": ("use_beta_sigmas", True),
    "sgm_uniform": ("timestep_spacing", "trailing"),
}
SIGMA_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def sampler_names() -> tuple[str, ...]:
    return (DEFAULT, *SAMPLERS)


def schedule_names() -> tuple[str, ...]:
    return (DEFAULT, *SCHEDULES)


def check_schedule(name: str) -> str:
    name = (name or DEFAULT).strip().lower()
    if name != DEFAULT and name not in SCHEDULES:
        raise InvalidArgument(f"unknown schedule {name!r}; choose one of {', '.join(schedule_names())}")
    return name


def _accepts(scheduler_class: type, option: str) -> bool:
    return option in inspect.signature(scheduler_class.__init__).parameters


def check_options(sampler: str, schedule: str, eta: float, base_scheduler: Any) -> None:
    """Refuse a schedule or an eta that the sampler (on this base) cannot take."""
    scheduler_class = _sampler_class(sampler, base_scheduler)
    if schedule != DEFAULT:
        option = SCHEDULES[schedule][0]
        if not _accepts(scheduler_class, option):
            names = sampler_names()
            takes = [name for name in names if _accepts(_sampler_class(name, base_scheduler), option)]
            raise InvalidArgument(
                f"schedule {schedule!r} needs a sampler that takes it ({scheduler_class.__name__} does not): "
                f"use one of {', '.join(takes)}"
            )
    if eta and "eta" not in inspect.signature(scheduler_class.step).parameters:
        raise InvalidArgument(
            f"sampler {sampler!r} ({scheduler_class.__name__}) has no eta: leave eta unset, or use ddim"
        )


def _sampler_class(name: str, base_scheduler: Any) -> type:
    import diffusers

    if name == DEFAULT:
        return type(base_scheduler)
    return getattr(diffusers, SAMPLERS[name][0])


def check_sampler(name: str) -> str:
    name = (name or DEFAULT).strip().lower()
    if name != DEFAULT and name not in SAMPLERS:
        raise InvalidArgument(f"unknown scheduler {name!r}; choose one of {', '.join(sampler_names())}")
    return name


def make_sampler(name: str, base_scheduler: Any, schedule: str = DEFAULT) -> Any:
    """A fresh scheduler named ``name`` (``default``: the base model's own) on the base's noise
    schedule, walking the sigmas of ``schedule`` (``default``: the sampler's own)."""
    name, schedule = check_sampler(name), check_schedule(schedule)
    overrides: dict[str, Any] = {} if name == DEFAULT else dict(SAMPLERS[name][1])
    if schedule != DEFAULT:
        option, value = SCHEDULES[schedule]
        if option in SIGMA_OPTIONS:  # one sigma schedule at a time
            overrides.update({other: False for other in SIGMA_OPTIONS})
        overrides[option] = value
    scheduler_class = _sampler_class(name, base_scheduler)
    accepted = {key: value for key, value in overrides.items() if _accepts(scheduler_class, key)}
    return scheduler_class.from_config(base_scheduler.config, **accepted)
