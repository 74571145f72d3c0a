"""Structured logs: JSON or key=value text formatters and one record per finished generation.

Each generation record carries the request id, the blend signature, the seed, the
adapters and the timings; the prompt is logged as its sha256 unless ``log_prompts`` is
on (prompts may be personal data).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from typing import Any

REQUEST_LOG = logging.getLogger("loraloom.requests")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of ``record`` (what a plain format string would drop)."""
    fields = vars(record).items()
    return {key: value for key, value in fields if key not in _STANDARD and not key.startswith("_")}


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``: the ``extra=`` fields after the message."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = extra_fields(record)
        if not fields:
            return line
        head, newline, rest = line.partition("\n")  # keep a traceback below the fields
        pairs = " ".join(f"{key}={_plain(value)}" for key, value in fields.items())
        return f"{head} {pairs}{newline}{rest}"


_BARE = re.compile(r"[\w.:@/+,-]+")


def _plain(value: Any) -> str:
    """``value`` as one key=value token: bare when that is safe, else JSON-quoted (no forged lines)."""
    text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every ``extra=`` field."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(extra_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str, fmt: str = "text") -> None:
    """Root logging: ``fmt`` "json" (one object a line) or "text"."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def prompt_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


class RequestLogger:
    """A service observer: logs each finished generation on ``loraloom.requests``."""

    def __init__(self, log_prompts: bool = False, logger: logging.Logger = REQUEST_LOG) -> None:
        self.log_prompts = log_prompts
        self.logger = logger

    def __call__(self, request, result=None, error: BaseException | None = None) -> None:
        fields: dict[str, Any] = {
            "request_id": request.request_id,
            "prompt_sha256": prompt_digest(request.prompt),
            "adapters": [f"{ref}:{weight:g}" for ref, weight in request.adapters],
        }
        if self.log_prompts:
            fields["prompt"] = request.prompt
        if result is not None:
            fields.update(
                blend_signature=result.blend_signature,
                seed=result.parameters.seed,
                steps=result.parameters.steps,
                queue_ms=round(result.timings.queue_ms, 1),
                swap_ms=round(result.timings.swap_ms, 1),
                denoise_ms=round(result.timings.denoise_ms, 1),
                status="OK",
            )
            self.logger.info("generated", extra=fields)
        else:
            fields.update(seed=request.seed, status=type(error).__name__)
            self.logger.info("generation failed: %s", error, extra=fields)
