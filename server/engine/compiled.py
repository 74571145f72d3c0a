"""Opt-in ``torch.compile`` of the resident UNet that survives LoRA hot-swaps without recompiling.

The fused hot-swap (``server.engine.fuse``) repoints each target parameter's
``.data`` at the blend's weights: the parameter objects stay, their tensors
change. Dynamo treats a module's parameters as graph inputs and guards only on
their metadata (shape, stride, dtype, device), never on their values, so a
compiled graph reads whatever tensor a parameter holds at call time and a swap
costs no recompile, as long as nothing turns the weights into constants:

- inductor ``freezing`` would fold the base weights into the compiled code
  (later blends would be silently ignored), so it is refused;
- CUDA graphs (``mode="reduce-overhead"``) record the weights' addresses, and a
  swap moves them (a re-record per blend), so they are off.

A blend's weights have the base weight's shape, dtype and device and are
contiguous like a freshly loaded weight, so their metadata guards hold. The
UNet is compiled in place (``nn.Module.compile``): the pipeline keeps the same
module object, the denoising loop is unchanged, and ``unet.forward`` still runs
it eagerly (tests compare the two). Graphs are compiled lazily, on the first
call with a new input shape (image size, batch, guidance on or off).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapters.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileSettings:
    """How the UNet is compiled.

    ``backend``: a ``torch.compile`` backend; ``inductor`` generates kernels
    (C++ on CPU, Triton on CUDA), ``aot_eager`` only traces (fast to compile:
    what the CPU tests use to check guards and swaps).
    ``dynamic``: ``None`` lets dynamo mark a dimension dynamic once it has seen
    it change (one recompile), ``False`` compiles a graph per input shape.
    ``max_autotune``: let inductor benchmark kernel choices (minutes of compile).
    """

    backend: str = "inductor"
    dynamic: bool | None = None
    fullgraph: bool = False
    max_autotune: bool = False

    def options(self) -> dict[str, Any] | None:
        """Inductor options: never freeze the weights, never record CUDA graphs."""
        if self.backend != "inductor":
            return None
        return {"freezing": False, "triton.cudagraphs": False, "max_autotune": self.max_autotune}


def compile_unet(unet: nn.Module, settings: CompileSettings | None = None) -> nn.Module:
    """Compile ``unet`` in place so that swapping its weights does not recompile; returns it."""
    settings = settings or CompileSettings()
    import torch._inductor.config as inductor_config

    if inductor_config.freezing:
        raise FailedPrecondition(
            "torch inductor freezing is on (TORCHINDUCTOR_FREEZING=1): it bakes the base weights "
            "into the compiled UNet, so LoRA blends would be ignored; unset it to compile the engine"
        )
    if settings.backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise InvalidArgument(
            f"unknown torch.compile backend {settings.backend!r}: use inductor (or aot_eager to only trace)"
        )
    unet.compile(
        backend=settings.backend,
        dynamic=settings.dynamic,
        fullgraph=settings.fullgraph,
        options=settings.options(),
    )
    log.info("UNet compiled with %s (graphs are built on first use of each input shape)", settings)
    return unet


def compile_engine_unet(pipeline: Any, backend: str, setting: bool | CompileSettings) -> None:
    """The engine's ``compile=`` argument: ``True`` (default settings) or ``CompileSettings``."""
    if backend != "torch":
        raise InvalidArgument(
            f"compile applies to the torch backend; backend {backend} runs its own optimized UNet: "
            "use backend=torch with compile, or drop compile"
        )
    compile_unet(pipeline.unet, setting if isinstance(setting, CompileSettings) else None)


def is_compiled(unet: nn.Module) -> bool:
    """Whether ``unet`` was compiled in place (its calls go through dynamo)."""
    return getattr(unet, "_compiled_call_impl", None) is not None


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (a swap that recompiled would raise it)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def channels_last_inputs(unet: nn.Module) -> Any:
    """Feed ``unet`` its latents in channels_last, leaving its weights as they are; returns the hook handle.

    On CUDA, a convolution whose input is channels_last runs cuDNN's NHWC
    kernels (tensor cores) and its output stays channels_last. The weights
    keep their layout on purpose: converting them would make a blend (written
    contiguous by the fused swap) differ in strides from the base, which costs
    a layout copy on every swap and, when compiled, a recompile.
    """

    def to_channels_last(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        elif "sample" in kwargs:
            kwargs = {**kwargs, "sample": kwargs["sample"].contiguous(memory_format=torch.channels_last)}
        return args, kwargs

    return unet.register_forward_pre_hook(to_channels_last, with_kwargs=True)
