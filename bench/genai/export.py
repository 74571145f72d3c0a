"""Export a loraloom ``BaseModel`` to the diffusers-style OpenVINO folder GenAI's Text2ImagePipeline reads.

The layout (what optimum-intel writes, reproduced without it)::

    model_index.json            StableDiffusionPipeline, component classes
    scheduler/scheduler_config.json   EulerDiscreteScheduler on the base's noise schedule
    tokenizer/openvino_tokenizer.xml  CLIP BPE (openvino_tokenizers), ids as in the project's tokenizer
    text_encoder/openvino_model.xml   input_ids -> last_hidden_state; config.json (CLIPTextConfig)
    unet/openvino_model.xml           sample, timestep (i64), encoder_hidden_states -> noise; config.json
    vae_decoder/openvino_model.xml    latent_sample -> image in [-1, 1]; config.json (AutoencoderKL)

An SDXL model (two text encoders, ``text_time`` added conditioning) is written as GenAI's
``StableDiffusionXLPipeline`` reads it, as optimum-intel lays it out: ``tokenizer_2/`` and
``text_encoder_2/`` beside the first pair; each text encoder returns its two outputs
(``last_hidden_state``, ``pooler_output``; encoder 2: ``text_embeds``, ``last_hidden_state``)
then every hidden state (GenAI reads the penultimate one by index), and the UNet takes
``text_embeds`` and ``time_ids`` too.

GenAI has no DPM++ solver, so the scheduler is Euler (what the bench asks loraloom for too).
Weights are saved as float32 (no fp16 compression): the runtime's precision hint alone
decides bf16 vs f32, and an f32 run sees the base weights exactly.

Weight names keep the torch module paths (``down_blocks.0.attentions.0...to_q.weight``),
which is what GenAI's LoRA loader matches kohya names against.

Exports are cached under ``LORALOOM_HOME/cache/genai/<key>/`` where the key hashes the
base fingerprint, this exporter's format and the OpenVINO version; a folder is built
beside its final place and renamed in, so a reader never sees half an export.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.errors import FailedPrecondition
from adapters.home import cache_dir
from server.models.families import family_of

EXPORT_FORMAT = 1  # bump when the layout or the graphs below change
# GenAI's pipeline class and the text components it reads, per family (``Family.name``).
PIPELINES = {
    "sd1": ("StableDiffusionPipeline", ("tokenizer",), ("text_encoder",)),
    "sdxl": ("StableDiffusionXLPipeline", ("tokenizer", "tokenizer_2"), ("text_encoder", "text_encoder_2")),
}
PIPELINES["sd2"] = PIPELINES["sd1"]  # as exported before families existed; the bench runs sd1 and sdxl


@dataclass(frozen=True)
class GenaiExport:
    """An exported model folder and whether it came from the cache."""

    path: Path
    cached: bool


class _TextEncoder(nn.Module):
    """``input_ids -> last_hidden_state``, weights named ``text_model.encoder.layers...``.

    GenAI finds a kohya text-encoder module (``lora_te_text_model_encoder_layers_0_...``) by
    substring in the weight names; transformers 5 flattens ``CLIPTextModel`` (no ``text_model``
    inside), so the transformer is held under that name here either way.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.text_model = getattr(encoder, "text_model", encoder)

    def forward(self, input_ids):
        return self.text_model(input_ids, return_dict=False)[0]


class _TextEncoderStates(nn.Module):
    """``input_ids -> (output 0, output 1, hidden state 0..N)``: what GenAI's SDXL pipeline reads by index.

    Weight names contain ``text_model.encoder.layers...`` (a flattened CLIPTextModel is held
    under that name, as ``_TextEncoder`` does), where GenAI's LoRA loader looks for kohya's
    ``lora_te1_``/``lora_te2_`` modules.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.held = "encoder" if hasattr(encoder, "text_model") else "text_model"
        setattr(self, self.held, encoder)

    def forward(self, input_ids):
        output = getattr(self, self.held)(input_ids, output_hidden_states=True, return_dict=True)
        return (output[0], output[1], *output.hidden_states)


class _Unet(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class _UnetXL(_Unet):
    """The UNet with SDXL's added conditioning as two more inputs."""

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


class _VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def _openvino():
    try:
        import openvino
        import openvino_tokenizers
    except ImportError as error:
        raise FailedPrecondition(
            f"exporting for OpenVINO GenAI needs openvino and openvino-tokenizers ({error}): "
            "pip install -e '.[bench]'"
        ) from None
    return openvino, openvino_tokenizers


def export_key(fingerprint: str) -> str:
    openvino, _ = _openvino()
    text = json.dumps(
        {
            "fingerprint": fingerprint,
            "format": EXPORT_FORMAT,
            "openvino": openvino.get_version(),
            "torch": torch.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def export_for_genai(base: Any, *, folder: Path | None = None) -> GenaiExport:
    """The GenAI folder of ``base`` (a ``BaseModel``), exported on first use and cached.

    Export before any blend is written into the pipeline: the files hold the weights as they are now.
    """
    root = (folder or cache_dir() / "genai") / export_key(base.fingerprint)
    if (root / "model_index.json").is_file():
        return GenaiExport(root, cached=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-"))
    try:
        write_folder(base.pipeline, staging)
        try:
            staging.rename(root)
        except OSError:  # another process finished first; its folder is complete
            if not (root / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return GenaiExport(root, cached=False)


def write_folder(pipeline: Any, root: Path) -> None:
    """Write every component of ``pipeline`` (a diffusers SD 1.x or SDXL pipeline) into ``root``."""
    openvino, _ = _openvino()
    family = family_of(pipeline)
    if family.name not in PIPELINES:
        raise FailedPrecondition(f"no GenAI export for {family.title} (only {', '.join(PIPELINES)})")
    pipeline_class, tokenizers, text_encoders = PIPELINES[family.name]
    for name in ("scheduler", *tokenizers, *text_encoders, "unet", "vae_decoder"):
        (root / name).mkdir(parents=True, exist_ok=True)
    _write_scheduler(pipeline, root / "scheduler")
    for name in tokenizers:
        _write_tokenizer(getattr(pipeline, name), root / name)

    tokens = pipeline.tokenizer.model_max_length
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks turned constant
        graphs = {
            name: _text_graph(openvino, getattr(pipeline, name), tokens, len(text_encoders) > 1)
            for name in text_encoders
        }
        graphs["unet"] = _unet_graph(openvino, pipeline)
        vae, size = pipeline.vae, pipeline.unet.config.sample_size
        graphs["vae_decoder"] = (
            openvino.convert_model(
                _VaeDecoder(vae), example_input=torch.zeros(1, vae.config.latent_channels, size, size)
            ),
            ["latent_sample"],
            ["sample"],
        )
    for component, (graph, inputs, outputs) in graphs.items():
        for port, name in zip(graph.inputs, inputs, strict=True):
            port.get_tensor().set_names({name})
        for port, name in zip(graph.outputs, outputs, strict=True):
            port.get_tensor().set_names({name})
        openvino.save_model(graph, root / component / "openvino_model.xml", compress_to_fp16=False)
    for name in text_encoders:
        _write_config(getattr(pipeline, name).config.to_dict(), root / name)
    _write_config(dict(pipeline.unet.config), root / "unet")
    _write_config(dict(vae.config), root / "vae_decoder")
    index: dict[str, Any] = {
        "_class_name": pipeline_class,
        "_diffusers_version": _diffusers_version(),
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        **{name: ["transformers", "CLIPTokenizer"] for name in tokenizers},
        **{name: ["transformers", type(getattr(pipeline, name)).__name__] for name in text_encoders},
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if family.name == "sdxl":
        index["force_zeros_for_empty_prompt"] = bool(
            getattr(pipeline.config, "force_zeros_for_empty_prompt", True)
        )
    else:
        index.update(
            requires_safety_checker=False, safety_checker=[None, None], feature_extractor=[None, None]
        )
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _text_graph(openvino, encoder: nn.Module, tokens: int, states: bool) -> tuple[Any, list[str], list[str]]:
    """A text encoder's graph, its input and output names: ``last_hidden_state`` alone (SD 1.x), or
    with ``states`` its two outputs and every hidden state (SDXL)."""
    example = torch.zeros(1, tokens, dtype=torch.int64)
    if not states:
        return (
            openvino.convert_model(_TextEncoder(encoder), example_input=example),
            ["input_ids"],
            ["last_hidden_state"],
        )
    projected = hasattr(encoder, "text_projection")  # CLIPTextModelWithProjection
    first = ["text_embeds", "last_hidden_state"] if projected else ["last_hidden_state", "pooler_output"]
    hidden = [f"hidden_states.{index}" for index in range(encoder.config.num_hidden_layers + 1)]
    return (
        openvino.convert_model(_TextEncoderStates(encoder), example_input=example),
        ["input_ids"],
        first + hidden,
    )


def _unet_graph(openvino, pipeline: Any) -> tuple[Any, list[str], list[str]]:
    """The UNet's graph (with ``text_embeds`` and ``time_ids`` for SDXL's ``text_time`` conditioning)."""
    unet, tokens = pipeline.unet, pipeline.tokenizer.model_max_length
    size = unet.config.sample_size
    example = [
        torch.zeros(2, unet.config.in_channels, size, size),
        torch.tensor([1], dtype=torch.int64),
        torch.zeros(2, tokens, unet.config.cross_attention_dim),
    ]
    inputs = ["sample", "timestep", "encoder_hidden_states"]
    wrapper: nn.Module = _Unet(unet)
    if unet.config.addition_embed_type == "text_time":
        pooled = pipeline.text_encoder_2.config.projection_dim
        example += [torch.zeros(2, pooled), torch.zeros(2, 6)]
        inputs += ["text_embeds", "time_ids"]
        wrapper = _UnetXL(unet)
    return openvino.convert_model(wrapper, example_input=tuple(example)), inputs, ["out_sample"]


def _write_scheduler(pipeline: Any, folder: Path) -> None:
    """Euler on the base's own noise schedule: the sampler the bench asks loraloom for too."""
    from diffusers import EulerDiscreteScheduler

    EulerDiscreteScheduler.from_config(pipeline.scheduler.config).save_config(str(folder))


def _write_tokenizer(tokenizer: Any, folder: Path) -> None:
    """The CLIP tokenizer as OpenVINO models, truncating to the text encoder's context (77 ids)."""
    openvino, openvino_tokenizers = _openvino()
    ov_tokenizer, ov_detokenizer = openvino_tokenizers.convert_tokenizer(
        tokenizer, with_detokenizer=True, truncation=True, max_length=tokenizer.model_max_length
    )
    openvino.save_model(ov_tokenizer, folder / "openvino_tokenizer.xml")
    openvino.save_model(ov_detokenizer, folder / "openvino_detokenizer.xml")
    tokenizer.save_pretrained(str(folder))


def _write_config(config: dict[str, Any], folder: Path) -> None:
    plain = {key: value for key, value in config.items() if not key.startswith("_") or key == "_class_name"}
    (folder / "config.json").write_text(json.dumps(plain, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | set):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
