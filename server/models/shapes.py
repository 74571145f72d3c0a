"""Describe a loaded pipeline to ``adapters``: module key -> weight shape.

Module keys are ``<component>.<module path>`` in the conventional diffusers /
transformers naming that LoRA files use. transformers >= 5.6 flattened
``CLIPTextModel`` (its modules no longer sit under ``text_model.``); keys keep
the ``text_model.`` level regardless, so adapter files made for either layout
name the same module.
"""

from __future__ import annotations

from torch import nn

from adapters.canonical import ModuleShapes

LORA_TARGET_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def _key_prefix(component: str, model: nn.Module) -> str:
    if component in TEXT_ENCODERS and not hasattr(model, "text_model"):
        return f"{component}.text_model."
    return f"{component}."


def lora_targets(pipeline) -> dict[str, nn.Module]:
    """Every layer an adapter may update, keyed ``<component>.<module path>``."""
    targets: dict[str, nn.Module] = {}
    for component in ("unet", *TEXT_ENCODERS):
        model = getattr(pipeline, component, None)
        if model is None:
            continue
        prefix = _key_prefix(component, model)
        for name, module in model.named_modules():
            if isinstance(module, LORA_TARGET_TYPES) and name:
                targets[prefix + name] = module
    return targets


def module_shapes(pipeline) -> ModuleShapes:
    return {key: tuple(module.weight.shape) for key, module in lora_targets(pipeline).items()}
