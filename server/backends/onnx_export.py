"""Export a pipeline's UNet to ONNX with stable, named weights for every LoRA target.

Two layouts, both named by the canonical module key (``unet.<module path>``):

* ``weights="inputs"``: every adapter-targetable weight is a *graph input* named by
  its key, shaped like the torch weight, and so is each such layer's bias (named
  ``<key>.bias``: full-weight diffs may change it). A runtime binds them once to
  buffers and a hot-swap writes new values into those buffers (ONNX Runtime and
  OpenVINO backends).
* ``weights="initializers"``: the weights stay initializers (for TensorRT, which
  refits initializers). Exported with ``do_constant_folding=False`` so the
  exporter never folds a weight into an anonymous transposed constant; each
  initializer keeps its ``state_dict`` name (``<module path>.weight``), which
  ``initializer_key_map`` maps back to the canonical key.

Exports are cached under ``LORALOOM_HOME/cache/onnx/<key>/unet.onnx`` where the key
hashes the base model's fingerprint and the export settings; a file is written
to a temporary folder and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from adapters.errors import InvalidArgument
from adapters.home import cache_dir
from server.engine.plan import bias_key
from server.models.shapes import lora_targets

SAMPLE = "sample"
TIMESTEP = "timestep"
HIDDEN = "encoder_hidden_states"
OUTPUT = "noise"
EXPORT_FORMAT = 2  # bump when the graph layout below changes (2: biases of the targets are inputs)


@dataclass(frozen=True)
class ExportSettings:
    weights: str = "inputs"  # "inputs" | "initializers"
    opset: int = 17

    def __post_init__(self) -> None:
        if self.weights not in ("inputs", "initializers"):
            raise InvalidArgument(f"weights={self.weights!r}: use 'inputs' or 'initializers'")


@dataclass(frozen=True)
class ExportedUnet:
    """An exported UNet: the file and the canonical keys of its named weights (in input order), and
    with ``weights="inputs"`` the keys of the bias inputs (``bias_key``: ``<key>.bias``)."""

    path: Path
    weight_keys: tuple[str, ...]
    settings: ExportSettings
    cached: bool
    bias_keys: tuple[str, ...] = ()


def unet_targets(pipeline) -> dict[str, nn.Module]:
    """The UNet's adapter-targetable modules, keyed ``unet.<module path>`` (sorted)."""
    return {key: module for key, module in sorted(lora_targets(pipeline).items()) if key.startswith("unet.")}


def bias_targets(targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The targets that have a bias, keyed by their bias key (``<key>.bias``), in ``targets``' order."""
    return {
        bias_key(key): module for key, module in targets.items() if getattr(module, "bias", None) is not None
    }


def target_tensors(targets: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The float32 base tensors behind the inputs: every target's weight, then their biases."""
    tensors = {key: module.weight.detach().to(torch.float32).contiguous() for key, module in targets.items()}
    tensors.update(
        {
            key: module.bias.detach().to(torch.float32).contiguous()
            for key, module in bias_targets(targets).items()
        }
    )
    return tensors


def export_key(fingerprint: str, settings: ExportSettings) -> str:
    """The cache key of an export: base fingerprint, settings, exporter and torch versions."""
    text = json.dumps(
        {"fingerprint": fingerprint, **asdict(settings), "format": EXPORT_FORMAT, "torch": torch.__version__},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class _WeightsAsInputs(nn.Module):
    """Calls the UNet with the target weights (then the biases of ``biased``) swapped for traced inputs."""

    def __init__(
        self, unet: nn.Module, modules: list[nn.Module], biased: list[nn.Module] | None = None
    ) -> None:
        super().__init__()
        self.unet = unet
        self.targets = modules
        self.biased = biased or []

    def forward(self, sample, timestep, hidden, *tensors):
        slots = [(module, "weight") for module in self.targets] + [(module, "bias") for module in self.biased]
        saved = [module._parameters[name] for module, name in slots]
        try:
            for (module, name), tensor in zip(slots, tensors, strict=True):
                module._parameters[name] = tensor
            return self.unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]
        finally:
            for (module, name), tensor in zip(slots, saved, strict=True):
                module._parameters[name] = tensor


class _Plain(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, hidden):
        return self.unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]


def example_inputs(unet, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    config = unet.config
    size = config.sample_size
    sample = torch.randn(batch, config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    timestep = torch.full((batch,), 500.0)
    hidden = torch.randn(batch, 77, config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    return sample, timestep, hidden


def export_unet(
    pipeline,
    fingerprint: str,
    settings: ExportSettings | None = None,
    *,
    folder: Path | None = None,
) -> ExportedUnet:
    """Export (or find in the cache) ``pipeline.unet`` as ONNX; see the module docstring."""
    settings = settings or ExportSettings()
    targets = unet_targets(pipeline)
    keys = tuple(targets)
    biased = bias_targets(targets) if settings.weights == "inputs" else {}
    root = (folder or cache_dir() / "onnx") / export_key(fingerprint, settings)
    path = root / "unet.onnx"
    if path.is_file():
        return ExportedUnet(
            path=path, weight_keys=keys, settings=settings, cached=True, bias_keys=tuple(biased)
        )
    unet = pipeline.unet.eval()
    inputs = example_inputs(unet)
    dynamic = {name: {0: "batch"} for name in (SAMPLE, TIMESTEP, HIDDEN, OUTPUT)}
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=root.parent))
    try:
        if settings.weights == "inputs":
            model: nn.Module = _WeightsAsInputs(unet, list(targets.values()), list(biased.values()))
            weights = tuple(module.weight.detach() for module in targets.values())
            biases = tuple(module.bias.detach() for module in biased.values())
            args, names = (*inputs, *weights, *biases), [SAMPLE, TIMESTEP, HIDDEN, *keys, *biased]
        else:
            model, args, names = _Plain(unet), inputs, [SAMPLE, TIMESTEP, HIDDEN]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings on diffusers' shape checks
            torch.onnx.export(
                model,
                args,
                str(staging / "unet.onnx"),
                dynamo=False,
                export_params=True,
                do_constant_folding=False,
                input_names=names,
                output_names=[OUTPUT],
                dynamic_axes=dynamic,
                opset_version=settings.opset,
            )
        try:
            os.rename(staging, root)
        except OSError:  # another process exported it first: use theirs
            if not path.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportedUnet(path=path, weight_keys=keys, settings=settings, cached=False, bias_keys=tuple(biased))


def initializer_key_map(onnx_path: Path, canonical_keys: tuple[str, ...] | list[str]) -> dict[str, str]:
    """ONNX initializer name -> canonical key, for every canonical key the graph holds by name.

    Initializers of an ``"initializers"`` export are named ``unet.<path>.weight``
    (the wrapper's ``state_dict`` names). Raises if any key has no initializer:
    a refit could then not swap that weight.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    present = {init.name for init in model.graph.initializer}
    mapping = {f"{key}.weight": key for key in canonical_keys if f"{key}.weight" in present}
    missing = sorted(set(canonical_keys) - set(mapping.values()))
    if missing:
        raise InvalidArgument(
            f"{len(missing)} adapter-targetable weights are not named initializers of {onnx_path} "
            f"(e.g. {missing[0]}); re-export with weights='initializers'"
        )
    return mapping
