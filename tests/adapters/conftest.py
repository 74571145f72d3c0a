"""Real LoRA files made from the micro factory model by diffusers' and PEFT's own writers.

One unet LoRA (attention, feed-forward, 1x1 and 3x3 conv layers: LoRA + LoCon) and
one text-encoder LoRA are made with PEFT (``unet.add_adapter`` for the UNet,
``inject_adapter_in_model`` for the text encoder, since transformers' own
``add_adapter`` needs a newer PEFT), with ``init_lora_weights=False`` so every
factor is non-zero. The same weights are then written by diffusers
(``save_lora_weights``), converted by diffusers (``convert_state_dict_to_kohya``)
and saved by PEFT (``save_pretrained``). The reference deltas are what PEFT itself
computes: ``get_delta_weight`` per layer, and ``merge()`` minus the base weight.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from adapters.formats.names import resolve_key

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "v_proj", "fc1"]


@dataclass
class MadeLora:
    """Files holding one LoRA, and the deltas PEFT computes for it (keyed by module key)."""

    files: dict[str, Path] = field(default_factory=dict)
    reference: dict[str, torch.Tensor] = field(default_factory=dict)
    merged: dict[str, torch.Tensor] = field(default_factory=dict)


@pytest.fixture(scope="session")
def micro_shapes(micro_pipeline):
    from server.models.shapes import module_shapes

    return dict(module_shapes(micro_pipeline))


def _peft_deltas(
    component: str, model, names: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PEFT's own per-layer delta, and the merged weight minus the base weight."""
    from peft.tuners.lora import LoraLayer

    reference: dict[str, torch.Tensor] = {}
    merged: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            # Module keys keep transformers 4's ``text_model.`` level (see server.models.shapes).
            key = resolve_key(f"{component}.{name.removeprefix('base_model.model.')}", names)
            reference[key] = module.get_delta_weight("default").detach().clone()
            base = module.get_base_layer().weight.detach().clone()
            module.merge(adapter_names=["default"])
            merged[key] = module.get_base_layer().weight.detach() - base
            module.unmerge()
    return reference, merged


def _make(micro_pipeline, tmp: Path, r: int, alpha: int, **pattern) -> tuple[MadeLora, dict, dict, object]:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from server.models.shapes import module_shapes

    names = set(module_shapes(micro_pipeline))
    torch.manual_seed(1234)
    unet = copy.deepcopy(micro_pipeline.unet)
    unet_config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=UNET_TARGETS, init_lora_weights=False, **pattern
    )
    unet.add_adapter(unet_config)
    text = copy.deepcopy(micro_pipeline.text_encoder)
    text_config = LoraConfig(r=2, lora_alpha=2, target_modules=TEXT_TARGETS, init_lora_weights=False)
    inject_adapter_in_model(text_config, text)
    unet_state = get_peft_model_state_dict(unet)
    text_state = get_peft_model_state_dict(text, adapter_name="default")
    made = MadeLora()
    for component, model in (("unet", unet), ("text_encoder", text)):
        reference, merged = _peft_deltas(component, model, names)
        made.reference.update(reference)
        made.merged.update(merged)
    out = tmp / "diffusers"
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=unet_state,
        text_encoder_lora_layers=text_state,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    made.files["diffusers"] = out / "pytorch_lora_weights.safetensors"
    return made, unet_state, text_state, (unet_config, text_config)


def _save_peft(micro_pipeline, tmp: Path, made: MadeLora, unet_state, text_state, configs) -> None:
    from peft import get_peft_model, set_peft_model_state_dict

    unet_config, text_config = configs
    for component, state, config in (
        ("unet", unet_state, unet_config),
        ("text_encoder", text_state, text_config),
    ):
        model = get_peft_model(copy.deepcopy(getattr(micro_pipeline, component)), copy.deepcopy(config))
        result = set_peft_model_state_dict(model, {f"base_model.model.{k}": v for k, v in state.items()})
        assert not [k for k in result.unexpected_keys if "lora" in k]
        model.save_pretrained(tmp / f"peft_{component}")
        made.files[f"peft_{component}"] = tmp / f"peft_{component}"


@pytest.fixture(scope="session")
def made_lora(micro_pipeline, tmp_path_factory) -> MadeLora:
    """alpha == rank, so diffusers' kohya conversion (which writes alpha = rank) keeps the scale."""
    import safetensors.torch
    from diffusers.utils import convert_state_dict_to_kohya

    tmp = tmp_path_factory.mktemp("lora_r4")
    made, unet_state, text_state, configs = _make(micro_pipeline, tmp, r=4, alpha=4)
    state = safetensors.torch.load_file(made.files["diffusers"])
    made.files["kohya_by_diffusers"] = tmp / "kohya.safetensors"
    safetensors.torch.save_file(convert_state_dict_to_kohya(state), made.files["kohya_by_diffusers"])
    _save_peft(micro_pipeline, tmp, made, unet_state, text_state, configs)
    return made


@pytest.fixture(scope="session")
def made_lora_patterns(micro_pipeline, tmp_path_factory) -> MadeLora:
    """alpha != rank, with per-module rank and alpha patterns (read from the metadata / config)."""
    tmp = tmp_path_factory.mktemp("lora_patterns")
    made, unet_state, text_state, configs = _make(
        micro_pipeline, tmp, r=4, alpha=8, rank_pattern={"to_k": 2}, alpha_pattern={"proj_in": 3}
    )
    _save_peft(micro_pipeline, tmp, made, unet_state, text_state, configs)
    return made
