"""Bearer tokens with two scopes, checked by a server interceptor before any loraloom.v1 call.

Scopes: ``generate`` (Generate, GenerateStream) and ``manage`` (upload, delete, alias,
load/unload adapters, verify the store). Read-only calls (list/get adapters, resident list, server info)
take a token of either scope. Health and reflection need none (kubelet probes).

Token table: one entry per line, ``<token> <scope>[,<scope>]`` (``#`` comments), from
``tokens_file`` (a mounted Secret) and/or ``LORALOOM_TOKENS`` (entries separated by
newlines or ``;``). No entries: authentication is off.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from adapters.errors import InvalidArgument
from server.api.errors import ANSWERED, ServiceInterceptor, rewrap

GENERATE = "generate"
MANAGE = "manage"
SCOPES = frozenset({GENERATE, MANAGE})
READ = frozenset({GENERATE, MANAGE})

METHOD_SCOPES: dict[str, frozenset[str]] = {
    "Generate": frozenset({GENERATE}),
    "GenerateStream": frozenset({GENERATE}),
    "UploadAdapter": frozenset({MANAGE}),
    "DeleteAdapter": frozenset({MANAGE}),
    "SetAlias": frozenset({MANAGE}),
    "LoadAdapter": frozenset({MANAGE}),
    "UnloadAdapter": frozenset({MANAGE}),
    "VerifyStore": frozenset({MANAGE}),
    "ListAdapters": READ,
    "GetAdapter": READ,
    "ListResidentAdapters": READ,
    "GetServerInfo": READ,
}


@dataclass(frozen=True)
class TokenTable:
    """sha256(token) -> scopes; tokens are compared by digest in constant time."""

    entries: tuple[tuple[bytes, frozenset[str]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.entries)

    @classmethod
    def parse(cls, text: str, source: str = "tokens") -> TokenTable:
        entries = []
        for number, raw in enumerate(text.replace(";", "\n").splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise InvalidArgument(
                    f"{source} line {number}: expected '<token> <scope>[,<scope>]' "
                    f"with scopes from {sorted(SCOPES)}"
                )
            token, scope_text = parts
            scopes = frozenset(scope.strip() for scope in scope_text.split(",") if scope.strip())
            unknown = scopes - SCOPES
            if unknown or not scopes:
                raise InvalidArgument(
                    f"{source} line {number}: unknown scope(s) {sorted(unknown)}; use {sorted(SCOPES)}"
                )
            entries.append((hashlib.sha256(token.encode()).digest(), scopes))
        return cls(tuple(entries))

    @classmethod
    def load(cls, path: Path | None = None, text: str | None = None) -> TokenTable:
        """The tokens of ``path`` (a file) plus those of ``text`` (the environment variable)."""
        tables = []
        if path is not None:
            tables.append(cls.parse(Path(path).read_text(), str(path)))
        if text:
            tables.append(cls.parse(text, "LORALOOM_TOKENS"))
        return cls(tuple(entry for table in tables for entry in table.entries))

    def scopes(self, token: str) -> frozenset[str] | None:
        """The token's scopes; None when it is not in the table."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, scopes in self.entries:
            if hmac.compare_digest(known, digest):
                found = scopes
        return found


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""
    return None


def check(table: TokenTable, method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
    """None when the call may proceed; else the status and a message saying what to do."""
    name = method.rsplit("/", 1)[-1]
    needed = METHOD_SCOPES.get(name, frozenset({MANAGE}))
    token = bearer(metadata)
    if token is None:
        return grpc.StatusCode.UNAUTHENTICATED, (
            "this server requires a bearer token: send 'authorization: Bearer <token>' "
            "(Client(token=...) or LORALOOM_TOKEN)"
        )
    scopes = table.scopes(token) if token else None
    if scopes is None:
        return grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid on this server"
    if not scopes & needed:
        return grpc.StatusCode.PERMISSION_DENIED, (
            f"{name} needs a token with scope {' or '.join(sorted(needed))}; "
            f"this token has {', '.join(sorted(scopes))}"
        )
    return None


class AuthInterceptor(ServiceInterceptor):
    """Refuses loraloom.v1 calls without a valid token of the method's scope."""

    def __init__(self, table: TokenTable) -> None:
        self.table = table

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        refusal = check(self.table, details.method, details.invocation_metadata)
        return handler if refusal is None else _refusing(handler, *refusal)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def refuse(request, context):
        await context.abort(code, message, trailing_metadata=ANSWERED)

    async def refuse_stream(request, context):
        await context.abort(code, message, trailing_metadata=ANSWERED)
        yield  # pragma: no cover - makes this an async generator

    return rewrap(handler, unary=lambda _behaviour: refuse, stream=lambda _behaviour: refuse_stream)
