"""The trained network: PEFT tuner layers injected into the frozen base, and their canonical form.

Every network type is one of PEFT's tuners, injected with ``inject_adapter_in_model``
into the modules ``target_modules`` names (the base stays frozen):

- ``lora``: LoRA (``LoraConfig``) on the targets as given (a conv target makes it LoCon);
- ``locon``: the same, with the UNet's conv layers added to the targets;
- ``loha``: LoHa (``LoHaConfig``), ``dW = alpha/r * (w1_a @ w1_b) * (w2_a @ w2_b)``;
- ``lokr``: LoKr (``LoKrConfig``), ``dW = alpha/r * kron(W1, W2)``;
- ``dora``: DoRA's magnitude on top of LoRA/LoCon (``LoraConfig(use_dora=True)``: one
  norm per output row or output channel, LyCORIS' ``wd_on_output``). PEFT has DoRA for
  LoRA only, so ``loha``/``lokr`` with DoRA are refused (``trainer.config``).

PEFT's LoHa and LoKr are ports of LyCORIS' modules (same factor shapes and math), so
``to_canonical`` reads the trained factors back as ``adapters.canonical`` modules one to
one, keyed by the base model's module keys (``server.models.shapes.lora_targets``): the
exported file carries LyCORIS' tensor names (``hada_w1_a``, ``lokr_w1``, ``dora_scale``)
and ``adapters.formats.load_adapter`` reads it as LoHa, LoKr or DoRA. The one difference:
PEFT scales a LoKr of two full matrices by ``alpha/r`` too, LyCORIS (and loraloom) by 1, so
that scale is folded into ``W1`` on export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from adapters.canonical import DoraScale, LohaModule, LokrModule, LoraModule, Module
from adapters.errors import InvalidArgument
from server.models.shapes import lora_targets

ADAPTER_NAME = "default"
NETWORKS = ("lora", "locon", "loha", "lokr")
# What each network type keeps per layer (PEFT's attribute names; also the checkpoint's tensor names).
PARAMETER_NAMES = {
    "lora": ("lora_A", "lora_B"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}
DORA_NAME = "lora_magnitude_vector"


def _family(network: str) -> str:
    return "lora" if network in ("lora", "locon") else network


@dataclass
class LoraNetwork:
    """The adapter layers added to a pipeline: which base module each one wraps, and its parameters."""

    layers: dict[str, BaseTunerLayer]  # canonical module key -> PEFT layer
    rank: int
    alpha: float
    network: str = "lora"
    dora: bool = False

    @property
    def parameter_names(self) -> tuple[str, ...]:
        names = PARAMETER_NAMES[_family(self.network)]
        return (*names, DORA_NAME) if self.dora else names

    def _tensors(self, layer: BaseTunerLayer) -> dict[str, nn.Parameter]:
        """The layer's trainable tensors by name (``lora_A`` is a module in PEFT: its weight)."""
        found = {}
        for name in self.parameter_names:
            container = getattr(layer, name)
            if ADAPTER_NAME in container:
                item = container[ADAPTER_NAME]
                found[name] = item if isinstance(item, nn.Parameter) else item.weight
        return found

    def parameters(self, component: str | None = None) -> list[nn.Parameter]:
        params = []
        for key, layer in self.layers.items():
            if component is None or key.split(".", 1)[0] == component:
                params.extend(self._tensors(layer).values())
        return params

    @property
    def has_conv(self) -> bool:
        return any(isinstance(layer.get_base_layer(), nn.Conv2d) for layer in self.layers.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors by a stable name, ``<module key>.<PEFT name>`` (for checkpoints)."""
        return {
            f"{key}.{name}": tensor.detach().clone()
            for key, layer in self.layers.items()
            for name, tensor in self._tensors(layer).items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise InvalidArgument(
                f"checkpoint does not match this network (missing {missing[:3]}, unexpected {extra[:3]}); "
                "resume with the same network, targets, rank and text-encoder setting"
            )
        with torch.no_grad():
            for key, layer in self.layers.items():
                for name, tensor in self._tensors(layer).items():
                    tensor.copy_(state[f"{key}.{name}"])

    def to_canonical(self) -> dict[str, Module]:
        """Each layer as the canonical module of its kind (float32, on the CPU)."""
        return {key: self._module(layer) for key, layer in self.layers.items()}

    def _module(self, layer: BaseTunerLayer) -> Module:
        t = {
            name: tensor.detach().to("cpu", torch.float32).contiguous().clone()
            for name, tensor in self._tensors(layer).items()
        }
        family = _family(self.network)
        if family == "loha":
            return LohaModule(
                t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], alpha=self.alpha
            )
        if family == "lokr":
            w1 = t.get("lokr_w1")
            if w1 is not None and "lokr_w2" in t:
                w1 = w1 * (self.alpha / self.rank)  # PEFT's alpha/r; LyCORIS' scale here is 1
            return LokrModule(
                alpha=self.alpha,
                w1=w1,
                w1_a=t.get("lokr_w1_a"),
                w1_b=t.get("lokr_w1_b"),
                w2=t.get("lokr_w2"),
                w2_a=t.get("lokr_w2_a"),
                w2_b=t.get("lokr_w2_b"),
            )
        dora = DoraScale(t[DORA_NAME].flatten(), "out") if self.dora else None
        return LoraModule(down=t["lora_A"], up=t["lora_B"], alpha=self.alpha, dora=dora)

    def kohya_metadata(self) -> dict[str, str]:
        """The ``ss_network_module``/``ss_network_args`` kohya's sd-scripts record for this network:
        ``networks.lora`` for plain LoRA/LoCon (``{}`` here: the caller's defaults), ``lycoris.kohya``
        with its ``algo`` (and ``dora_wd``) otherwise, as sd-scripts does with LyCORIS."""
        if self.network in ("lora", "locon") and not self.dora:
            return {}
        args = {"algo": self.network}
        if self.has_conv:
            args.update(conv_dim=str(self.rank), conv_alpha=_number(self.alpha))
        if self.dora:
            args.update(dora_wd="True", wd_on_output="True")
        return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def peft_config(network: str, *, rank: int, alpha: float, targets: list[str], dora: bool = False):
    """The PEFT tuner config of ``network`` (see the module docstring)."""
    if network not in NETWORKS:
        raise InvalidArgument(f"network must be one of {', '.join(NETWORKS)}, not {network!r}")
    family = _family(network)
    if dora and family != "lora":
        raise InvalidArgument(f"DoRA is trained on lora or locon networks, not {network}")
    if family == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=list(targets), init_weights=True)
    if family == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=list(targets), init_weights=True)
    return LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True, use_dora=dora
    )


def add_network(
    pipeline,
    *,
    rank: int,
    alpha: float,
    unet_targets: list[str],
    text_encoder_targets: list[str] | None = None,
    seed: int = 0,
    network: str = "lora",
    dora: bool = False,
    text_encoders: tuple[str, ...] = ("text_encoder",),
) -> LoraNetwork:
    """Inject ``network`` into the UNet (and the text encoder when given targets); the base stays frozen.

    The update is zero at step 0 (LoRA's ``lora_B``, LoHa's ``w2_b``, LoKr's ``w1`` start at zero;
    DoRA's magnitude starts at the base weight's norms); the other factors are drawn from a
    generator seeded with ``seed``.
    """
    keys_by_module = {id(module): key for key, module in lora_targets(pipeline).items()}
    components = [("unet", unet_targets)]
    if text_encoder_targets:  # each of ``text_encoders`` (SDXL: text_encoder and/or text_encoder_2)
        components.extend((name, text_encoder_targets) for name in text_encoders)
    layers: dict[str, BaseTunerLayer] = {}
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for component, targets in components:
            model = getattr(pipeline, component)
            model.requires_grad_(False)
            config = peft_config(network, rank=rank, alpha=alpha, targets=targets, dora=dora)
            try:
                inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
            except (ValueError, TypeError) as error:
                raise InvalidArgument(
                    f"cannot add {network} to the {component} with targets {targets}: {error}"
                ) from None
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    base = module.get_base_layer()
                    key = keys_by_module.get(id(base))
                    if key is None:
                        raise InvalidArgument(
                            f"{network} target {type(base).__name__} is not a linear or conv layer"
                        )
                    layers[key] = module
    finally:
        torch.random.set_rng_state(state)
    if not layers:
        raise InvalidArgument(f"no UNet module matches targets {unet_targets}")
    trained = LoraNetwork(
        layers=dict(sorted(layers.items())), rank=rank, alpha=alpha, network=network, dora=dora
    )
    for param in trained.parameters():
        param.requires_grad_(True)
    return trained
