"""Server configuration: one dataclass, filled from ``loraloom serve`` flags or ``LORALOOM_*`` variables.

Every field has an environment variable ``LORALOOM_<FIELD>`` (upper case); a flag
overrides it. Imports nothing heavy, so the CLI can build it before loading torch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
SECRET_FIELDS = frozenset({"tokens"})


@dataclass
class ServerConfig:
    """What ``server.api.app`` runs with."""

    host: str = field(default="127.0.0.1", metadata={"help": "Interface to listen on (0.0.0.0: all)."})
    port: int = field(default=50051, metadata={"help": "Port to listen on (0: any free port)."})
    model: str = field(
        default="toy",
        metadata={
            "help": "Base model: toy (trained, 64 px), micro|tiny|small (random weights), "
            "a diffusers folder, an SD 1.x file."
        },
    )
    device: str = field(default="cpu", metadata={"help": "torch device: cpu, cuda, cuda:1, ..."})
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16."})
    backend: str = field(
        default="auto",
        metadata={
            "help": "UNet backend: auto (openvino on a float32 CPU model when installed, else torch), "
            "torch, onnxruntime (CPU float32) or openvino (CPU; also encodes and decodes); "
            "see bench backends."
        },
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "Compute precision of backend openvino: auto (bf16 where the CPU has AVX512-BF16/AMX, "
            "else fp32), fp32 (torch's images within 2/255) or bf16 (within about 12/255)."
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "Backend torch: torch.compile the UNet (blend swaps never recompile; each new "
            "image size compiles once)."
        },
    )
    home: Path | None = field(default=None, metadata={"help": "Data folder (default: LORALOOM_HOME)."})
    store_db_url: str | None = field(
        default=None, metadata={"help": "Store database URL (default: SQLite in the data folder)."}
    )
    max_queue: int = field(default=32, metadata={"help": "Waiting requests before RESOURCE_EXHAUSTED."})
    max_group_skips: int = field(
        default=4, metadata={"help": "How often a request may be overtaken by same-blend groups."}
    )
    max_batch: int = field(
        default=1,
        metadata={
            "help": "Same-blend, same-size requests denoised together (1: every image bit-exact "
            "to its seed; 4: ~1.3x throughput under load, pixels within 1/255)."
        },
    )
    cache_mb: int = field(default=512, metadata={"help": "Adapter cache budget in MiB."})
    max_message_mb: int = field(default=64, metadata={"help": "Largest gRPC message in MiB (both ways)."})
    max_upload_mb: int = field(default=1024, metadata={"help": "Largest adapter upload in MiB."})
    image_chunk_bytes: int = field(
        default=0, metadata={"help": "GenerateStream image chunk size (0: message limit less 64 KiB)."}
    )
    default_steps: int = field(default=20, metadata={"help": "Steps when a request gives none."})
    max_steps: int = field(default=150, metadata={"help": "Most steps a request may ask for."})
    max_images: int = field(default=4, metadata={"help": "Most images per request."})
    max_adapters: int = field(default=8, metadata={"help": "Most adapters in one blend."})
    max_size: int = field(default=2048, metadata={"help": "Largest width or height in pixels."})
    grace_s: float = field(default=30.0, metadata={"help": "On SIGTERM, seconds in-flight calls may take."})
    warmup: bool = field(default=True, metadata={"help": "Run one generation before reporting ready."})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR."})
    s3_bucket: str | None = field(
        default=None, metadata={"help": "S3 bucket for adapter blobs (default: local folder)."}
    )
    s3_prefix: str = field(default="", metadata={"help": "Key prefix inside the S3 bucket."})
    s3_endpoint: str | None = field(
        default=None, metadata={"help": "S3-compatible endpoint URL (default: AWS)."}
    )
    s3_region: str | None = field(default=None, metadata={"help": "S3 region."})
    blob_cache_mb: int = field(default=2048, metadata={"help": "Local disk cache of S3 blobs in MiB."})
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
    metrics_port: int | None = field(
        default=None, metadata={"help": "Serve Prometheus /metrics over HTTP on this port (0: any)."}
    )
    log_format: str = field(
        default="text", metadata={"help": "Log format: text or json (one object a line)."}
    )
    log_prompts: bool = field(
        default=False, metadata={"help": "Log prompts in clear (default: only their sha256)."}
    )
    health_port: int | None = field(
        default=None, metadata={"help": "Also serve plaintext health on this port (kubelet probes; 0: any)."}
    )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MiB

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * MiB

    @property
    def chunk_bytes(self) -> int:
        """Largest image piece per GenerateStream message."""
        return self.image_chunk_bytes or max(self.max_message_bytes - 64 * 1024, 1024)

    def summary(self) -> str:
        shown = []
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            shown.append(f"{item.name}={'<hidden>' if item.name in SECRET_FIELDS and value else value}")
        return " ".join(shown)


def env_name(name: str) -> str:
    return f"LORALOOM_{name.upper()}"


def from_env(environ: dict[str, str] | None = None, **overrides) -> ServerConfig:
    """Defaults, then ``LORALOOM_*`` variables, then ``overrides`` (those not None)."""
    environ = os.environ if environ is None else environ
    values = {}
    for item in dataclasses.fields(ServerConfig):
        raw = environ.get(env_name(item.name))
        if raw is not None and raw != "":
            values[item.name] = _parse(item, raw)
    values.update({key: value for key, value in overrides.items() if value is not None})
    return ServerConfig(**values)


def _parse(item: dataclasses.Field, raw: str):
    kind = item.type if isinstance(item.type, str) else getattr(item.type, "__name__", str(item.type))
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    if kind.startswith("bool"):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if kind.startswith("Path"):
        return Path(raw).expanduser()
    return raw
