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

A UNet with added conditioning (SDXL: ``addition_embed_type == "text_time"``) takes
two more inputs after ``encoder_hidden_states``: ``text_embeds`` (the pooled text
embedding, ``(batch, width)``) and ``time_ids`` (``(batch, 6)``), its
``added_cond_kwargs``; which ones is read from the UNet's config (``added_inputs``).

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
TEXT_EMBEDS = "text_embeds"
TIME_IDS = "time_ids"
OUTPUT = "noise"
# Bump when the graph layout below changes (2: biases of the targets are inputs; 3: the prompt's
# token count is dynamic, so prompts longer than 77 tokens, encoded in chunks, run).
EXPORT_FORMAT = 3
TIME_ID_COUNT = 6  # SDXL's time ids: original size, crop top-left, target size


def added_inputs(config) -> tuple[str, ...]:
    """The added-conditioning inputs of a UNet with this config, in graph order: SDXL's
    ``text_embeds`` and ``time_ids`` for ``addition_embed_type == "text_time"``, else none."""
    return (TEXT_EMBEDS, TIME_IDS) if getattr(config, "addition_embed_type", None) == "text_time" else ()


def added_shapes(config, batch: int) -> dict[str, tuple[int, int]]:
    """The shape of each added input at ``batch`` (the pooled width is what the UNet's added
    projection takes besides the time-id embeddings)."""
    if not added_inputs(config):
        return {}
    width = config.projection_class_embeddings_input_dim - TIME_ID_COUNT * config.addition_time_embed_dim
    return {TEXT_EMBEDS: (batch, width), TIME_IDS: (batch, TIME_ID_COUNT)}


def added_values(names: tuple[str, ...], added_cond_kwargs: dict | None) -> list[torch.Tensor]:
    """The tensors of ``names`` from a UNet call's ``added_cond_kwargs``, in graph order."""
    if not names:
        return []
    missing = [name for name in names if name not in (added_cond_kwargs or {})]
    if missing:
        raise ValueError(f"this UNet needs added_cond_kwargs with {', '.join(missing)}")
    return [added_cond_kwargs[name] for name in names]  # type: ignore[index]


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
    added_inputs: tuple[str, ...] = ()  # SDXL's text_embeds, time_ids (after encoder_hidden_states)


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


def export_key(fingerprint: str, settings: ExportSettings, added: tuple[str, ...] = ()) -> str:
    """The cache key of an export: base fingerprint, settings, the added inputs (a graph with
    SDXL's inputs never shares a key with one without), exporter and torch versions."""
    fields = {"fingerprint": fingerprint, **asdict(settings), "format": EXPORT_FORMAT}
    fields["torch"] = torch.__version__
    if added:  # absent for SD 1.x/2.x, whose keys stay what they were
        fields["added"] = list(added)
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _forward(unet: nn.Module, added: tuple[str, ...], sample, timestep, hidden, extra) -> torch.Tensor:
    """The UNet's noise prediction, ``extra`` holding the added inputs' tensors (graph order)."""
    kwargs = {"added_cond_kwargs": dict(zip(added, extra, strict=True))} if added else {}
    return unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False, **kwargs)[0]


class _WeightsAsInputs(nn.Module):
    """Calls the UNet with the target weights (then the biases of ``biased``) swapped for traced
    inputs; the ``added`` inputs come first among ``tensors``."""

    def __init__(
        self,
        unet: nn.Module,
        modules: list[nn.Module],
        biased: list[nn.Module] | None = None,
        added: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.unet = unet
        self.targets = modules
        self.biased = biased or []
        self.added = added

    def forward(self, sample, timestep, hidden, *tensors):
        extra, tensors = tensors[: len(self.added)], tensors[len(self.added) :]
        slots = [(module, "weight") for module in self.targets] + [(module, "bias") for module in self.biased]
        saved = [module._parameters[name] for module, name in slots]
        try:
            for (module, name), tensor in zip(slots, tensors, strict=True):
                module._parameters[name] = tensor
            return _forward(self.unet, self.added, sample, timestep, hidden, extra)
        finally:
            for (module, name), tensor in zip(slots, saved, strict=True):
                module._parameters[name] = tensor


class _Plain(nn.Module):
    def __init__(self, unet: nn.Module, added: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.unet = unet
        self.added = added

    def forward(self, sample, timestep, hidden, *extra):
        return _forward(self.unet, self.added, sample, timestep, hidden, extra)


def example_inputs(unet, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    config = unet.config
    size = config.sample_size
    sample = torch.randn(batch, config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    timestep = torch.full((batch,), 500.0)
    hidden = torch.randn(batch, 77, config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    return sample, timestep, hidden


def example_added(unet, batch: int = 2) -> dict[str, torch.Tensor]:
    """Example ``added_cond_kwargs`` for ``unet`` (``{}`` for a UNet without added conditioning)."""
    shapes = added_shapes(unet.config, batch)
    if not shapes:
        return {}
    pixels = float(unet.config.sample_size * 8)  # the size a VAE of factor 8 decodes to
    return {
        TEXT_EMBEDS: torch.randn(*shapes[TEXT_EMBEDS], generator=torch.Generator().manual_seed(2)),
        TIME_IDS: torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]]).repeat(batch, 1),
    }


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
    added = added_inputs(pipeline.unet.config)
    root = (folder or cache_dir() / "onnx") / export_key(fingerprint, settings, added)
    path = root / "unet.onnx"
    if path.is_file():
        return ExportedUnet(path, keys, settings, cached=True, bias_keys=tuple(biased), added_inputs=added)
    unet = pipeline.unet.eval()
    conditioning = example_added(unet)
    inputs = (*example_inputs(unet), *(conditioning[name] for name in added))
    fixed = [SAMPLE, TIMESTEP, HIDDEN, *added]
    dynamic = {name: {0: "batch"} for name in (*fixed, OUTPUT)}
    dynamic[HIDDEN] = {0: "batch", 1: "tokens"}  # 77 per prompt chunk
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=root.parent))
    try:
        if settings.weights == "inputs":
            model: nn.Module = _WeightsAsInputs(unet, list(targets.values()), list(biased.values()), added)
            weights = tuple(module.weight.detach() for module in targets.values())
            biases = tuple(module.bias.detach() for module in biased.values())
            args, names = (*inputs, *weights, *biases), [*fixed, *keys, *biased]
        else:
            model, args, names = _Plain(unet, added), inputs, fixed
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
    return ExportedUnet(path, keys, settings, cached=False, bias_keys=tuple(biased), added_inputs=added)


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
