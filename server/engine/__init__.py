"""The resident engine: fused adapter hot-swap, weighted blends, the blend-aware scheduler."""

from server.engine.engine import Engine, NormalizedRequest, signature_id
from server.engine.prompt import ParsedPrompt, parse_prompt
from server.engine.resolvers import AdapterResolver, MemoryResolver, ResolvedAdapter, StoreResolver
from server.engine.types import (
    AppliedAdapter,
    EngineStats,
    GenerateRequest,
    GenerateResult,
    GenerationParameters,
    Limits,
    Progress,
    ResidentAdapter,
    Timings,
)

__all__ = [
    "AdapterResolver",
    "AppliedAdapter",
    "Engine",
    "EngineStats",
    "GenerateRequest",
    "GenerateResult",
    "GenerationParameters",
    "Limits",
    "MemoryResolver",
    "NormalizedRequest",
    "ParsedPrompt",
    "Progress",
    "ResidentAdapter",
    "ResolvedAdapter",
    "StoreResolver",
    "Timings",
    "parse_prompt",
    "signature_id",
]
