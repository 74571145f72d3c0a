"""The Python client of a loraloom server: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Imports only grpcio and protobuf (never torch or diffusers), so scripts and the CLI's
client commands start fast. Results are the dataclasses of ``server.client.types``;
failures raise the typed errors of ``adapters.errors`` (``ServerError`` for the rest).
"""

from server.client.aio import AsyncClient
from server.client.errors import ServerError
from server.client.sync import Client
from server.client.types import (
    AdapterInfo,
    AdapterPage,
    AdapterSpec,
    DamagedVersion,
    Done,
    GenerateResult,
    Image,
    ImageReady,
    Progress,
    Queued,
    ResidentList,
    ServerInfo,
    StoreReport,
    StreamEvent,
)

__all__ = [
    "AdapterInfo",
    "AdapterPage",
    "AdapterSpec",
    "AsyncClient",
    "Client",
    "DamagedVersion",
    "Done",
    "GenerateResult",
    "Image",
    "ImageReady",
    "Progress",
    "Queued",
    "ResidentList",
    "ServerError",
    "ServerInfo",
    "StoreReport",
    "StreamEvent",
]
