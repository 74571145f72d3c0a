"""A caller's request made exact, once: validated, prompt tags parsed, defaults filled, seed chosen,
pictures decoded and fitted.

No torch and no I/O: the service runs it, off the event loop, before anything is queued.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from adapters.blend import Merge, Weight, as_weight, parts_of
from adapters.errors import InvalidArgument
from server.engine.images import SourceImage, source_image
from server.engine.prompt import parse_prompt
from server.engine.samplers import check_sampler, check_schedule
from server.engine.types import (
    DEFAULT_STRENGTH,
    GenerateRequest,
    GenerationSettings,
    RunOptions,
)
from server.models.emphasis import parse_prompt_attention
from server.settings import Limits

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class NormalizedRequest:
    """A validated request: exact settings, the blend as asked (refs, not yet versions), run options."""

    settings: GenerationSettings
    adapters: tuple[tuple[str, Weight], ...]
    merge: Merge
    options: RunOptions


def normalize(
    request: GenerateRequest, limits: Limits, *, resolution: int, size_factor: int = 8
) -> NormalizedRequest:
    """Check ``request`` against ``limits`` and fill its defaults (``resolution``: the base's size;
    width and height must be multiples of ``size_factor``)."""
    if not isinstance(request.prompt, str) or not request.prompt.strip():
        raise InvalidArgument("prompt is empty: say what to draw")
    for label, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt or "")):
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limits.max_prompt_bytes:
            raise InvalidArgument(
                f"{label} is {size} bytes; at most {limits.max_prompt_bytes} are allowed: shorten it"
            )
    parsed = parse_prompt(request.prompt)
    negative = parse_prompt(request.negative_prompt or "")
    for text in (parsed.text, negative.text):
        parse_prompt_attention(text)  # a malformed emphasis weight fails here, not in a batch
    if negative.adapters:
        raise InvalidArgument("<lora:...> tags belong in the prompt, not the negative prompt")
    width = int(request.width or resolution)
    height = int(request.height or resolution)
    factor = max(8, int(size_factor))
    for label, value in (("width", width), ("height", height)):
        if value <= 0 or value > limits.max_size or value % factor:
            raise InvalidArgument(
                f"{label} {value} is not allowed: use a multiple of {factor} from {factor} "
                f"to {limits.max_size} pixels"
            )
    steps = int(request.steps)
    if not 1 <= steps <= limits.max_steps:
        raise InvalidArgument(f"steps {steps} is out of range: use 1 to {limits.max_steps}")
    guidance = float(request.guidance_scale)
    if not math.isfinite(guidance) or not 0.0 <= guidance <= 50.0:
        raise InvalidArgument(f"guidance_scale {guidance} is out of range: use 0 to 50 (1 disables it)")
    count = int(request.num_images)
    if not 1 <= count <= limits.max_images:
        raise InvalidArgument(f"num_images {count} is out of range: use 1 to {limits.max_images}")
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    if not 0 <= int(seed) <= MAX_SEED - count:
        raise InvalidArgument(f"seed {seed} is out of range: use 0 to {MAX_SEED - count}")
    adapters = (*((str(r), as_weight(w)) for r, w in request.adapters), *parsed.adapters)
    check_blend(adapters, limits)
    if request.preview_every < 0:
        raise InvalidArgument("preview_every must be >= 0")
    init_image, mask, strength = _pictures(request, width, height, steps, limits)
    settings = GenerationSettings(
        prompt=parsed.text,
        negative_prompt=negative.text,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        seed=int(seed),
        sampler=check_sampler(request.sampler),
        num_images=count,
        strength=strength,
        init_image=init_image,
        mask=mask,
        clip_skip=_clip_skip(request.clip_skip),
        schedule=check_schedule(request.schedule),
        eta=_eta(request.eta),
    )
    options = RunOptions(request.deadline, int(request.preview_every), request.request_id)
    return NormalizedRequest(settings, adapters, request.merge, options)


def check_blend(adapters: tuple[tuple[str, Weight], ...], limits: Limits) -> None:
    """The one check of a blend as asked: refs present, weights (each part's) finite and bounded,
    not too many."""
    for ref, weight in adapters:
        if not ref:
            raise InvalidArgument("an adapter reference is empty: give 'name', 'name@3' or 'name@alias'")
        for value in parts_of(weight):
            if not math.isfinite(value) or abs(value) > limits.max_abs_weight:
                raise InvalidArgument(
                    f"adapter {ref!r} weight {value} is out of range: use -{limits.max_abs_weight:g} "
                    f"to {limits.max_abs_weight:g}"
                )
    if len(adapters) > limits.max_adapters:
        raise InvalidArgument(
            f"{len(adapters)} adapters in one blend; at most {limits.max_adapters} are allowed"
        )


def _pictures(
    request: GenerateRequest, width: int, height: int, steps: int, limits: Limits
) -> tuple[SourceImage | None, SourceImage | None, float]:
    """The init image and mask fitted to the request's size, and the strength that runs."""
    if not request.init_image:
        if request.mask_image:
            raise InvalidArgument("mask_image needs an init_image: the picture to repaint parts of")
        if request.strength is not None and float(request.strength) != 1.0:
            raise InvalidArgument("strength needs an init_image (img2img); without one leave it unset")
        return None, None, 1.0
    strength = DEFAULT_STRENGTH if request.strength is None else float(request.strength)
    if not math.isfinite(strength) or not 0.0 < strength <= 1.0:
        raise InvalidArgument(f"strength {strength} is out of range: use a value in (0, 1]")
    if int(steps * strength) < 1:
        raise InvalidArgument(
            f"strength {strength} of {steps} steps runs no step (int(steps * strength) = 0): "
            "raise strength or steps"
        )
    pixels = limits.max_input_pixels
    init = source_image(bytes(request.init_image), "init_image", width, height, pixels)
    mask = None
    if request.mask_image:
        mask = source_image(bytes(request.mask_image), "mask_image", width, height, pixels, mode="L")
        if mask.original_size != init.original_size:
            raise InvalidArgument(
                f"mask_image is {mask.original_size[0]}x{mask.original_size[1]} but init_image is "
                f"{init.original_size[0]}x{init.original_size[1]}: the mask must have the init image's size"
            )
    return init, mask, strength


MAX_CLIP_SKIP = 12


def _clip_skip(value: int) -> int:
    """A1111's clip skip: 0 and 1 both mean the last layer."""
    value = int(value or 1)
    if not 1 <= value <= MAX_CLIP_SKIP:
        raise InvalidArgument(f"clip_skip {value} is out of range: use 1 (the last layer) to {MAX_CLIP_SKIP}")
    return value


def _eta(value: float | None) -> float:
    eta = 0.0 if value is None else float(value)
    if not math.isfinite(eta) or not 0.0 <= eta <= 1.0:
        raise InvalidArgument(f"eta {eta} is out of range: use 0 (deterministic) to 1")
    return eta
