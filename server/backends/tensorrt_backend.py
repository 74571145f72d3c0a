"""TensorRT UNet with refit-based hot-swap (optional extra ``loraloom[tensorrt]``; CUDA only).

Built from the ``weights="initializers"`` ONNX export (``onnx_export``), whose
adapter-targetable weights are initializers named ``unet.<path>.weight``; the
ONNX parser hands those names to TensorRT, so the ``Refitter`` accepts them
verbatim (``initializer_key_map``). The engine is built with
``BuilderFlag.REFIT``; its serialized plan is cached under a key of the base
fingerprint, the export and build settings, the TensorRT version and the GPU.

A swap refits every weight the previous or the new blend touches with
``W0 + B @ A`` computed from the pristine base (``refit_arrays``), never from
the engine's current weights, so nothing of the previous blend can leak into
the next (TensorRT issue 3628). Any further weight the refitter reports missing
is supplied from the same source.

A UNet with added conditioning (SDXL) takes ``added_cond_kwargs`` (``text_embeds``,
``time_ids``) as two more inputs, each with its own profile shapes
(``onnx_export.added_shapes``).

Everything up to the TensorRT calls (the name map, the arrays, the cache key)
is plain numpy/torch and tested on CPU; the rest needs ``tensorrt`` and CUDA,
imported lazily (``require_tensorrt``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters.blend import Dense, LowRank, Rescaled, Update, add_update
from adapters.errors import FailedPrecondition, InvalidArgument
from adapters.home import cache_dir
from server.backends.onnx_export import (
    HIDDEN,
    OUTPUT,
    SAMPLE,
    TIMESTEP,
    ExportSettings,
    added_inputs,
    added_shapes,
    added_values,
    export_key,
    export_unet,
    initializer_key_map,
    unet_targets,
)
from server.engine.plan import BlendPlan

INSTALL_HINT = (
    "install the TensorRT extra on a machine with an NVIDIA GPU and CUDA: "
    "pip install 'loraloom[tensorrt]' (TensorRT wheels come from NVIDIA's index: "
    "--extra-index-url https://pypi.nvidia.com), or use backend='torch'"
)


def require_tensorrt() -> Any:
    """Import ``tensorrt``, or raise ``FailedPrecondition`` saying what is missing and how to get it."""
    if not torch.cuda.is_available():
        raise FailedPrecondition(
            f"the TensorRT backend needs a CUDA device and none is visible; {INSTALL_HINT}"
        )
    try:
        import tensorrt  # type: ignore[import-not-found]
    except ImportError as error:
        raise FailedPrecondition(
            f"the TensorRT backend needs the tensorrt package ({error}); {INSTALL_HINT}"
        ) from None
    return tensorrt


@dataclass(frozen=True)
class BuildSettings:
    fp16: bool = True
    min_batch: int = 1
    opt_batch: int = 2
    max_batch: int = 8
    sample_size: int = 0  # 0: the UNet's own sample_size
    tokens: int = 77  # the optimal prompt length: one chunk
    max_tokens: int = 77 * 8  # the longest prompt the engine takes: 8 chunks of 75 tokens


def plan_cache_key(
    fingerprint: str,
    export: ExportSettings,
    build: BuildSettings,
    trt_version: str,
    gpu: str,
    added: tuple[str, ...] = (),
) -> str:
    """A serialized plan's key: what was exported (``added``: the UNet's added inputs), how it was
    built, which TensorRT, which GPU."""
    text = json.dumps(
        {
            "export": export_key(fingerprint, export, added),
            "build": asdict(build),
            "tensorrt": trt_version,
            "gpu": gpu,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def refit_name_map(onnx_path: Path, pipeline) -> dict[str, str]:
    """Refit weight name (the ONNX initializer name) -> canonical key, for every UNet LoRA target."""
    return initializer_key_map(onnx_path, tuple(unet_targets(pipeline)))


def keys_to_refit(previous: Iterable[str], plan: BlendPlan | None, known: Iterable[str]) -> list[str]:
    """Keys the swap must write: those the previous blend touched and those ``plan`` touches."""
    known = set(known)
    new = {key for key in (plan.updates if plan is not None else ()) if key in known}
    return sorted(set(previous) | new)


@torch.no_grad()
def refit_arrays(
    pristine: Mapping[str, torch.Tensor], plan: BlendPlan | None, keys: Iterable[str]
) -> dict[str, np.ndarray]:
    """Per key, float32 ``W0 + B @ A`` (``W0`` where ``plan`` does not touch it), from the pristine base."""
    updates = plan.updates if plan is not None else {}
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        base = pristine[key].detach().to("cpu", torch.float32).contiguous()
        if key in updates:
            arrays[key] = add_update(base, _on_cpu(updates[key])).numpy()
        else:
            arrays[key] = base.numpy().copy()
    return arrays


def _on_cpu(update: Update) -> Update:
    if isinstance(update, Rescaled):
        return Rescaled(_on_cpu(update.inner), update.scale.to("cpu", torch.float32))
    if isinstance(update, LowRank):
        return LowRank(update.down.to("cpu", torch.float32), update.up.to("cpu", torch.float32))
    return Dense(update.delta.to("cpu", torch.float32))


class TensorRTUnet:
    """The UNet forward on a refittable TensorRT engine (CUDA); called like a diffusers UNet."""

    def __init__(
        self, pipeline, fingerprint: str, build: BuildSettings | None = None, *, folder: Path | None = None
    ) -> None:
        trt = require_tensorrt()
        self._trt = trt
        self.build_settings = build or BuildSettings()
        export = ExportSettings(weights="initializers")
        onnx_folder = folder / "onnx" if folder is not None else None
        self.exported = export_unet(pipeline, fingerprint, export, folder=onnx_folder)
        self.name_map = refit_name_map(self.exported.path, pipeline)  # onnx name -> key
        self._onnx_name = {key: name for name, key in self.name_map.items()}
        targets = unet_targets(pipeline)
        self._pristine = {
            key: m.weight.detach().to("cpu", torch.float32).clone() for key, m in targets.items()
        }
        self._touched: set[str] = set()
        self.signature: tuple[tuple[str, float], ...] = ()
        self._logger = trt.Logger(trt.Logger.WARNING)
        gpu = torch.cuda.get_device_name()
        self.added = self.exported.added_inputs  # SDXL: text_embeds, time_ids
        key = plan_cache_key(fingerprint, export, self.build_settings, trt.__version__, gpu, self.added)
        plans = (folder or cache_dir()) / "tensorrt"
        plans.mkdir(parents=True, exist_ok=True)
        plan_path = plans / f"{key}.plan"
        if not plan_path.is_file():
            data = self._build(pipeline.unet)
            handle, staging = tempfile.mkstemp(dir=plans, prefix=".plan-")
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            os.replace(staging, plan_path)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise FailedPrecondition(
                f"TensorRT could not load the cached plan {plan_path}; delete it to rebuild"
            )
        self.context = self.engine.create_execution_context()
        self.refitter = trt.Refitter(self.engine, self._logger)
        self._initializers: dict[str, np.ndarray] | None = None
        config = pipeline.unet.config
        self.config = config
        self.device = torch.device("cuda")
        self.dtype = torch.float32
        self.stream = torch.cuda.Stream()

    def _build(self, unet) -> bytes:
        trt, settings = self._trt, self.build_settings
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(self.exported.path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise FailedPrecondition(f"TensorRT could not parse {self.exported.path}: {errors}")
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.REFIT)
        if settings.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        size = settings.sample_size or unet.config.sample_size
        channels, width = unet.config.in_channels, unet.config.cross_attention_dim
        profile = builder.create_optimization_profile()
        batches = (settings.min_batch, settings.opt_batch, settings.max_batch)
        profile.set_shape(SAMPLE, *[(b, channels, size, size) for b in batches])
        profile.set_shape(TIMESTEP, *[(b,) for b in batches])
        tokens = (settings.tokens, settings.tokens, settings.max_tokens)
        profile.set_shape(HIDDEN, *[(b, n, width) for b, n in zip(batches, tokens, strict=True)])
        for name in added_inputs(unet.config):
            profile.set_shape(name, *[added_shapes(unet.config, b)[name] for b in batches])
        config.add_optimization_profile(profile)
        data = builder.build_serialized_network(network, config)
        if data is None:
            raise FailedPrecondition("TensorRT failed to build the UNet engine (see its log above)")
        return bytes(data)

    def _base_initializer(self, name: str) -> np.ndarray:
        """A base weight by ONNX name (for weights the refitter asks for beyond the targets)."""
        if self._initializers is None:
            import onnx
            from onnx import numpy_helper

            model = onnx.load(str(self.exported.path))
            self._initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
        return self._initializers[name]

    def apply(self, plan: BlendPlan | None) -> int:
        """Refit the engine to ``plan`` (``None``: the base), always from the pristine base weights."""
        trt = self._trt
        keys = keys_to_refit(self._touched, plan, self._pristine)
        arrays = refit_arrays(self._pristine, plan, keys)
        keep: list[np.ndarray] = []  # the refitter reads host arrays during refit_cuda_engine
        for key, array in arrays.items():
            keep.append(np.ascontiguousarray(array))
            if not self.refitter.set_named_weights(self._onnx_name[key], trt.Weights(keep[-1])):
                raise FailedPrecondition(f"TensorRT refused new weights for {key}")
        for name in self.refitter.get_missing_weights():
            key = self.name_map.get(name)
            if key is not None:
                value = refit_arrays(self._pristine, plan, [key])[key]
            else:
                value = self._base_initializer(name)
            keep.append(np.ascontiguousarray(value))
            self.refitter.set_named_weights(name, trt.Weights(keep[-1]))
        if not self.refitter.refit_cuda_engine():
            raise FailedPrecondition("TensorRT refit failed; the engine's weights are undefined, rebuild it")
        self._touched = {key for key in (plan.updates if plan is not None else ()) if key in self._pristine}
        self.signature = plan.signature if plan is not None else ()
        return len(keys)

    def __call__(
        self,
        sample,
        timestep,
        encoder_hidden_states=None,
        added_cond_kwargs: dict | None = None,
        return_dict: bool = False,
        **_: Any,
    ):
        batch = sample.shape[0]
        most = self.build_settings.max_tokens
        if encoder_hidden_states.shape[1] > most:
            raise InvalidArgument(
                f"the prompt encodes to {encoder_hidden_states.shape[1]} tokens; this TensorRT engine takes "
                f"at most {most} ({most // 77} chunks of 75 tokens): shorten it"
            )
        added = added_values(self.added, added_cond_kwargs)
        inputs = {
            SAMPLE: sample.to("cuda", torch.float32).contiguous(),
            TIMESTEP: torch.as_tensor(timestep, dtype=torch.float32)
            .reshape(-1)
            .expand(batch)
            .to("cuda")
            .contiguous(),
            HIDDEN: encoder_hidden_states.to("cuda", torch.float32).contiguous(),
            **{
                name: tensor.to("cuda", torch.float32).contiguous()
                for name, tensor in zip(self.added, added, strict=True)
            },
        }
        out = torch.empty_like(inputs[SAMPLE])
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.context.set_tensor_address(OUTPUT, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise FailedPrecondition("TensorRT execution failed")
        torch.cuda.current_stream().wait_stream(self.stream)
        return (out.to(sample.device, sample.dtype),)
