"""Every setting of a loraloom server and its default, in one place; no grpc, no torch.

The settings are grouped by the part that uses them (model, engine, request
limits, scheduler, store, api). Each field is also a ``loraloom serve`` flag
(``--cache-mb``) and a ``LORALOOM_<FIELD>`` variable (``LORALOOM_CACHE_MB``):
defaults, then variables, then flags. Only the CLI reads the environment
(``Settings.load``); everything below is handed its section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.envsettings import values_from_env
from adapters.store.settings import StoreSettings

MiB = 1 << 20
SECRET_FIELDS = frozenset({"tokens"})


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class ModelSettings:
    """Which base model, where and in what dtype."""

    model: str = _help(
        "Base model: toy (trained, 64 px), micro|tiny|small|tiny-sdxl|tiny-sd2 (random weights), "
        "a diffusers folder, or a single .safetensors file (SD 1.x, SD 2.x or SDXL).",
        "toy",
    )
    device: str = _help("torch device: cpu, cuda, cuda:1, ...", "cpu")
    dtype: str = _help("float32, float16 or bfloat16.", "float32")
    prediction_type: str = _help(
        "What the model predicts: auto (the model's own; a single file without configs: told from "
        "the file, SD 2.x 768-v is v_prediction), epsilon or v_prediction.",
        "auto",
    )


@dataclass(frozen=True)
class EngineSettings:
    """How the engine runs the model and how much adapter memory it keeps."""

    backend: str = _help(
        "UNet backend: auto (openvino on a float32 CPU model when installed, else torch), torch, "
        "onnxruntime (CPU float32) or openvino (CPU; also encodes and decodes); see bench backends.",
        "auto",
    )
    precision: str = _help(
        "Compute precision of backend openvino: auto (bf16 where the CPU has AVX512-BF16/AMX, else "
        "fp32), fp32 (torch's images within 2/255) or bf16 (within about 12/255).",
        "auto",
    )
    compile: bool = _help(
        "Backend torch: torch.compile the UNet (blend swaps never recompile; each new image size "
        "compiles once).",
        False,
    )
    compile_cache: bool = _help(
        "Backend openvino: keep compiled models in the data folder's cache (openvino/compiled), so a "
        "restart imports them instead of compiling (SD 1.5: ~97 s a start); the bf16 VAE decoder is "
        "always compiled fresh.",
        True,
    )
    w0_on_host: bool = _help(
        "Keep the base's pristine weights (W0) in pinned host memory and write each blend into the "
        "GPU's weights in place (as A1111 and ComfyUI keep their backups): one copy of each weight "
        "in VRAM instead of two (SDXL fp16: 5.8 GB less), a swap copies W0 from the host, no blend "
        "is kept computed. On the CPU it saves nothing.",
        False,
    )
    cache_mb: int = _help("Adapter cache budget in MiB (prepared adapters; blend plans are apart).", 512)
    plan_cache_mb: int | None = _help(
        "Blend-plan cache budget in MiB: blends whose weights fit are kept computed, so switching "
        "back to one only repoints weights (SD 1.5: 1.4 GB a blend in float32). Default: 40 % of "
        "the memory beside the base model (RAM or container limit; a GPU's memory), 128 MiB to 32 GiB; "
        "a blend's weights are kept only while 15 % of the memory (at least 2 GiB) stays free.",
        None,
    )
    warmup: bool = _help("Run one generation before reporting ready.", True)
    oom_unready_after: int = _help(
        "Consecutive out-of-memory failures after which readiness reports NOT_SERVING (until a "
        "generation succeeds; a probe retries every 10 s).",
        3,
    )

    @property
    def cache_bytes(self) -> int:
        return self.cache_mb * MiB

    @property
    def plan_cache_bytes(self) -> int | None:
        """The plan cache budget asked for (``None``: sized from the machine's memory)."""
        return None if self.plan_cache_mb is None else self.plan_cache_mb * MiB


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (also reported by GetServerInfo)."""

    default_steps: int = _help("Steps when a request gives none.", 20)
    max_steps: int = _help("Most steps a request may ask for.", 150)
    max_images: int = _help("Most images per request.", 4)
    max_adapters: int = _help("Most adapters in one blend.", 8)
    max_size: int = _help("Largest width or height in pixels.", 2048)
    max_abs_weight: float = _help("Largest |weight| of one adapter in a blend.", 10.0)
    max_prompt_bytes: int = _help(
        "Longest prompt (and negative prompt) in UTF-8 bytes; the text encoder reads all of it, "
        "75 tokens at a time.",
        16384,
    )
    max_rank: int = _help(
        "Largest adapter rank (network dim) accepted; a module of a higher rank than its weight's "
        "smaller dimension is kept as its dense update.",
        1024,
    )
    max_input_pixels: int = _help(
        "Most pixels (width x height) of an img2img init image or inpainting mask, as decoded.",
        4096 * 4096,
    )


@dataclass(frozen=True)
class SchedulerSettings:
    """The request queue in front of the engine."""

    max_queue: int = _help("Waiting requests before RESOURCE_EXHAUSTED.", 32)
    max_group_skips: int = _help("How often a request may be overtaken by same-blend groups.", 4)
    max_batch: int = _help(
        "Same-blend, same-size requests denoised together (1: every image bit-exact to its seed; "
        "4: ~1.3x throughput under load, pixels within 1/255).",
        1,
    )


@dataclass(frozen=True)
class ApiSettings:
    """The gRPC face: address, message sizes, security, observability, shutdown."""

    host: str = _help("Interface to listen on (0.0.0.0: all).", "127.0.0.1")
    port: int = _help("Port to listen on (0: any free port).", 50051)
    max_message_mb: int = _help("Largest gRPC message in MiB (both ways).", 64)
    image_chunk_bytes: int = _help("GenerateStream image chunk size (0: message limit less 64 KiB).", 0)
    grace_s: float = _help("On SIGTERM, seconds in-flight calls may take.", 30.0)
    log_level: str = _help("DEBUG, INFO, WARNING or ERROR.", "INFO")
    log_format: str = _help("Log format: text or json (one object a line).", "text")
    log_prompts: bool = _help("Log prompts in clear (default: only their sha256).", False)
    tls_cert: Path | None = field(default=None, metadata={"help": "PEM server certificate (turns TLS on)."})
    tls_key: Path | None = field(default=None, metadata={"help": "PEM private key of tls_cert."})
    tls_client_ca: Path | None = field(
        default=None, metadata={"help": "PEM CA bundle: clients must present a certificate it signed (mTLS)."}
    )
    tokens_file: Path | None = field(
        default=None, metadata={"help": "File of '<token> <scope>[,<scope>]' lines (generate, manage)."}
    )
    tokens: str | None = field(
        default=None,
        repr=False,
        metadata={"help": "Token entries like tokens_file, separated by ';' (prefer the file)."},
    )
    metrics_port: int | None = _help("Serve Prometheus /metrics over HTTP on this port (0: any).", None)
    health_port: int | None = _help(
        "Also serve plaintext health on this port (kubelet probes; 0: any).", None
    )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MiB

    @property
    def chunk_bytes(self) -> int:
        """Largest image piece per GenerateStream message."""
        return self.image_chunk_bytes or max(self.max_message_bytes - 64 * 1024, 1024)


SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "engine": EngineSettings,
    "limits": Limits,
    "scheduler": SchedulerSettings,
    "store": StoreSettings,
    "api": ApiSettings,
}


@dataclass(frozen=True)
class Settings:
    """A server's whole configuration, one section per part."""

    model: ModelSettings = field(default_factory=ModelSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    limits: Limits = field(default_factory=Limits)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    api: ApiSettings = field(default_factory=ApiSettings)

    @classmethod
    def of(cls, **flat: Any) -> Settings:
        """Defaults with ``flat`` field values (``port=0, model="micro"``) put in their sections."""
        unknown = sorted(set(flat) - set(SECTION_OF))
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(unknown)}")
        sections = {
            name: kind(**{key: value for key, value in flat.items() if SECTION_OF[key] == name})
            for name, kind in SECTIONS.items()
        }
        return cls(**sections)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``LORALOOM_*`` variables, then ``overrides`` (those not None)."""
        values: dict[str, Any] = {}
        for kind in SECTIONS.values():
            values.update(values_from_env(kind, environ))
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls.of(**values)

    def replace(self, **flat: Any) -> Settings:
        """A copy with ``flat`` field values changed."""
        current = {
            item.name: getattr(getattr(self, section), item.name) for section, item in setting_fields()
        }
        return Settings.of(**{**current, **flat})

    def summary(self) -> str:
        """Every setting as ``name=value`` (secrets hidden), for the start-up log line."""
        shown = []
        for section, item in setting_fields():
            value = getattr(getattr(self, section), item.name)
            shown.append(f"{item.name}={'<hidden>' if item.name in SECRET_FIELDS and value else value}")
        return " ".join(shown)


def setting_fields() -> Iterator[tuple[str, dataclasses.Field]]:
    """``(section, field)`` for every setting, in section order."""
    for section, kind in SECTIONS.items():
        for item in dataclasses.fields(kind):
            yield section, item


SECTION_OF: dict[str, str] = {item.name: section for section, item in setting_fields()}
FIELDS: dict[str, dataclasses.Field] = {item.name: item for _, item in setting_fields()}
assert len(SECTION_OF) == sum(len(dataclasses.fields(kind)) for kind in SECTIONS.values()), (
    "setting names must be unique across sections (each is one flag and one variable)"
)
