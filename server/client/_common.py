"""What the sync and async clients share: target, channel options, request building."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from server.api.pb.loraloom.v1 import adapters_pb2, server_pb2

DEFAULT_PORT = 50051
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_CHUNK_BYTES = 1 << 20
READINESS_SERVICE = "loraloom.v1.Loraloom"


def default_target() -> str:
    """``$LORALOOM_SERVER`` or 127.0.0.1:50051."""
    return os.environ.get("LORALOOM_SERVER") or DEFAULT_TARGET


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def read_adapter(source: str | Path | bytes) -> tuple[bytes, str]:
    """The file's bytes and their sha256 hex digest."""
    data = source if isinstance(source, bytes) else Path(source).expanduser().read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def list_request(
    name_prefix: str = "",
    architecture: str = "",
    tag: str = "",
    all_versions: bool = False,
    page_size: int = 0,
    page_token: str = "",
) -> adapters_pb2.ListAdaptersRequest:
    return adapters_pb2.ListAdaptersRequest(
        name_prefix=name_prefix,
        architecture=architecture,
        tag=tag,
        all_versions=all_versions,
        page_size=page_size,
        page_token=page_token,
    )


SERVER_INFO_REQUEST = server_pb2.GetServerInfoRequest()


MAX_RETRY_DELAY_S = 30.0


def retry_delay(error: Exception, attempt: int) -> float | None:
    """Seconds to wait before retry ``attempt`` (0-based) after ``error``; None: do not retry.

    RESOURCE_EXHAUSTED waits as long as the server's hint says (a negative hint: do not retry,
    e.g. images over the message limit); UNAVAILABLE (starting, draining, unreachable) backs off
    exponentially from 0.25 s.
    """
    from adapters.errors import ResourceExhausted, Unavailable

    if isinstance(error, ResourceExhausted):
        if error.retry_after_s < 0:
            return None
        return min(error.retry_after_s, MAX_RETRY_DELAY_S)
    if isinstance(error, Unavailable):
        return min(0.25 * 2**attempt, MAX_RETRY_DELAY_S)
    return None
