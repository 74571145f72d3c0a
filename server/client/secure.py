"""Client channels with TLS / mutual TLS and a bearer token (``authorization`` metadata)."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import grpc
from grpc import aio

from server.api.tls import channel_credentials

ENV_TOKEN = "LORALOOM_TOKEN"


class _Details(
    collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


def _with_token(details, token: str):
    metadata = [*(details.metadata or ()), ("authorization", f"Bearer {token}")]
    return _Details(
        details.method,
        details.timeout,
        metadata,
        details.credentials,
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )


class TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a sync channel."""

    def __init__(self, token: str) -> None:
        self.token = token

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_token(details, self.token), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_token(details, self.token), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(_with_token(details, self.token), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(_with_token(details, self.token), requests)


class _AioToken:
    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, details):
        metadata = aio.Metadata(*(details.metadata or ()))
        metadata.add("authorization", f"Bearer {self.token}")
        return details._replace(metadata=metadata)


class _AioUnaryUnary(_AioToken, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioUnaryStream(_AioToken, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioStreamUnary(_AioToken, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, requests):
        return await continuation(self._details(details), requests)


class _AioStreamStream(_AioToken, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, requests):
        return await continuation(self._details(details), requests)


def resolve_token(token: str | None) -> str | None:
    return token if token is not None else (os.environ.get(ENV_TOKEN) or None)


def sync_channel(
    target: str,
    options: list,
    *,
    token: str | None = None,
    tls: bool = False,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> grpc.Channel:
    """Secure when ``tls`` or a TLS file is given; the token (or $LORALOOM_TOKEN) on every call."""
    if tls or tls_ca or tls_cert:
        channel = grpc.secure_channel(target, channel_credentials(tls_ca, tls_cert, tls_key), options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    token = resolve_token(token)
    return grpc.intercept_channel(channel, TokenInterceptor(token)) if token else channel


def aio_channel(
    target: str,
    options: list,
    *,
    token: str | None = None,
    tls: bool = False,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> aio.Channel:
    token = resolve_token(token)
    interceptors = (
        [kind(token) for kind in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]
        if token
        else None
    )
    if tls or tls_ca or tls_cert:
        credentials = channel_credentials(tls_ca, tls_cert, tls_key)
        return aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
    return aio.insecure_channel(target, options=options, interceptors=interceptors)
