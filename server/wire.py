"""Trailing-metadata keys the server sends and the client reads (imports neither grpc nor torch)."""

from __future__ import annotations

# The retry hint of RESOURCE_EXHAUSTED: gRPC's own retry pushback (honoured by clients with
# a retry policy) and a plain one in seconds.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
RETRY_AFTER_KEY = "retry-after-s"
# Set on every status a loraloom server sends, so a client can tell "the server said UNAVAILABLE
# (starting, draining)" from "nothing answered at that address" (same code, from the transport).
ANSWERED_KEY = "loraloom-answered"
ANSWERED: tuple[tuple[str, str], ...] = ((ANSWERED_KEY, "1"),)
