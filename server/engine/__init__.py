"""The resident engine: fused adapter hot-swap, weighted blends, the blend-aware scheduler."""

from server.engine.engine import BatchEntry, Engine, signature_id
from server.engine.plan import BlendPlan, EngineBackend, TorchBackend, one_thread
from server.engine.prompt import ParsedPrompt, parse_prompt
from server.engine.request import NormalizedRequest, normalize
from server.engine.resolvers import AdapterResolver, MemoryResolver, StoreResolver
from server.engine.types import (
    AppliedAdapter,
    EngineStats,
    GenerateRequest,
    GenerateResult,
    GenerationParameters,
    GenerationSettings,
    Job,
    Limits,
    Progress,
    QueueStats,
    ResidentAdapter,
    ResolvedAdapter,
    ResolvedBlend,
    RunOptions,
    Timings,
)

__all__ = [
    "AdapterResolver",
    "AppliedAdapter",
    "BatchEntry",
    "BlendPlan",
    "Engine",
    "EngineBackend",
    "EngineStats",
    "GenerateRequest",
    "GenerateResult",
    "GenerationParameters",
    "GenerationSettings",
    "Job",
    "Limits",
    "MemoryResolver",
    "NormalizedRequest",
    "ParsedPrompt",
    "Progress",
    "QueueStats",
    "ResidentAdapter",
    "ResolvedAdapter",
    "ResolvedBlend",
    "RunOptions",
    "StoreResolver",
    "Timings",
    "TorchBackend",
    "normalize",
    "one_thread",
    "parse_prompt",
    "signature_id",
]
