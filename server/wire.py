"""Trailing-metadata keys the server sends and the client reads (imports neither grpc nor torch)."""

from __future__ import annotations

# The retry hint of RESOURCE_EXHAUSTED: gRPC's own retry pushback (honoured by clients with
# a retry policy) and a plain one in seconds.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
RETRY_AFTER_KEY = "retry-after-s"  # seconds, a decimal that may be fractional ("0.5")
# A RESOURCE_EXHAUSTED that retrying cannot cure (a response over the message limit) has this
# ``retry_after_s``; it goes out as a negative pushback, gRPC's "do not retry" (gRFC A6), alone.
DO_NOT_RETRY = -1.0
# Set on every status a loraloom server sends, so a client can tell "the server said UNAVAILABLE
# (starting, draining)" from "nothing answered at that address" (same code, from the transport).
ANSWERED_KEY = "loraloom-answered"
ANSWERED: tuple[tuple[str, str], ...] = ((ANSWERED_KEY, "1"),)
