"""The trained LoRA network: PEFT layers injected into the frozen base, and their canonical form.

PEFT keeps ``lora_A`` (down) and ``lora_B`` (up) beside each wrapped layer;
``to_canonical`` reads them back as ``adapters.canonical.LoraModule`` keyed by
the base model's module keys (``server.models.shapes.lora_targets``), so the
text encoder's keys keep the ``text_model.`` level whatever transformers' layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from adapters.canonical import LoraModule
from adapters.errors import InvalidArgument
from server.models.shapes import lora_targets

ADAPTER_NAME = "default"


@dataclass
class LoraNetwork:
    """The LoRA layers added to a pipeline: which base module each one wraps, and its parameters."""

    layers: dict[str, LoraLayer]  # canonical module key -> PEFT layer
    rank: int
    alpha: float

    def parameters(self, component: str | None = None) -> list[nn.Parameter]:
        params = []
        for key, layer in self.layers.items():
            if component is None or key.split(".", 1)[0] == component:
                params.extend(layer.lora_A[ADAPTER_NAME].parameters())
                params.extend(layer.lora_B[ADAPTER_NAME].parameters())
        return params

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors by a stable name (for checkpoints)."""
        state = {}
        for key, layer in self.layers.items():
            state[f"{key}.lora_A"] = layer.lora_A[ADAPTER_NAME].weight.detach().clone()
            state[f"{key}.lora_B"] = layer.lora_B[ADAPTER_NAME].weight.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise InvalidArgument(
                f"checkpoint does not match this network (missing {missing[:3]}, unexpected {extra[:3]}); "
                "resume with the same targets, rank and text-encoder setting"
            )
        with torch.no_grad():
            for key, layer in self.layers.items():
                layer.lora_A[ADAPTER_NAME].weight.copy_(state[f"{key}.lora_A"])
                layer.lora_B[ADAPTER_NAME].weight.copy_(state[f"{key}.lora_B"])

    def to_canonical(self) -> dict[str, LoraModule]:
        modules = {}
        for key, layer in self.layers.items():
            down = layer.lora_A[ADAPTER_NAME].weight.detach().to("cpu", torch.float32).contiguous()
            up = layer.lora_B[ADAPTER_NAME].weight.detach().to("cpu", torch.float32).contiguous()
            modules[key] = LoraModule(down=down.clone(), up=up.clone(), alpha=self.alpha)
        return modules


def add_lora(
    pipeline,
    *,
    rank: int,
    alpha: float,
    unet_targets: list[str],
    text_encoder_targets: list[str] | None = None,
    seed: int = 0,
) -> LoraNetwork:
    """Inject LoRA into the UNet (and the text encoder when given targets); the base stays frozen.

    ``lora_B`` starts at zero (the adapted model equals the base at step 0);
    ``lora_A`` is drawn from a generator seeded with ``seed``.
    """
    keys_by_module = {id(module): key for key, module in lora_targets(pipeline).items()}
    components = [("unet", unet_targets)]
    if text_encoder_targets:
        components.append(("text_encoder", text_encoder_targets))
    layers: dict[str, LoraLayer] = {}
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for component, targets in components:
            model = getattr(pipeline, component)
            model.requires_grad_(False)
            config = LoraConfig(
                r=rank,
                lora_alpha=alpha,
                target_modules=list(targets),
                init_lora_weights=True,
            )
            try:
                inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
            except ValueError as error:
                raise InvalidArgument(
                    f"cannot add LoRA to the {component} with targets {targets}: {error}"
                ) from None
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    base = module.get_base_layer()
                    key = keys_by_module.get(id(base))
                    if key is None:
                        raise InvalidArgument(
                            f"LoRA target {type(base).__name__} is not a linear or conv layer"
                        )
                    layers[key] = module
    finally:
        torch.random.set_rng_state(state)
    if not layers:
        raise InvalidArgument(f"no UNet module matches targets {unet_targets}")
    network = LoraNetwork(layers=dict(sorted(layers.items())), rank=rank, alpha=alpha)
    for param in network.parameters():
        param.requires_grad_(True)
    return network
