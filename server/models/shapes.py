"""Describe a loaded pipeline to ``adapters``: module key -> weight shape."""

from __future__ import annotations

from torch import nn

from adapters.canonical import ModuleShapes

LORA_TARGET_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


def lora_targets(pipeline) -> dict[str, nn.Module]:
    """Every layer an adapter may update, keyed ``<component>.<module path>``."""
    targets: dict[str, nn.Module] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipeline, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if isinstance(module, LORA_TARGET_TYPES) and name:
                targets[f"{component}.{name}"] = module
    return targets


def module_shapes(pipeline) -> ModuleShapes:
    return {key: tuple(module.weight.shape) for key, module in lora_targets(pipeline).items()}
