"""The blend (plan) cache's budget and use in GetServerInfo and `loraloom info` (#22)."""

from __future__ import annotations

import grpc
from typer.testing import CliRunner

from server.engine.cache import MiB
from tests.api.helpers import adapter_bytes, micro_config


def _info_output(address: str) -> str:
    from server.cli.main import app

    result = CliRunner().invoke(app, ["info", "--server", address])
    assert result.exit_code == 0, result.output
    return result.output


def test_server_info_reports_the_engines_blend_cache(running, client, micro_shapes):
    """The default budget is the engine's own (computed from the memory beside the model); a blend
    held in the plan cache shows up in plan_bytes, on the wire and in the client's types."""
    from server.api.pb.loraloom.v1 import server_pb2, service_pb2_grpc

    engine = running.server.service.engine
    info = client.server_info()
    assert info.cache.plan_capacity_bytes == engine.plan_capacity_bytes > 0
    with grpc.insecure_channel(running.address) as channel:
        raw = service_pb2_grpc.LoraloomStub(channel).GetServerInfo(server_pb2.GetServerInfoRequest())
    assert raw.cache.plan_capacity_bytes == engine.plan_capacity_bytes

    client.upload_adapter(adapter_bytes(micro_shapes, seed=31), "blend-cache-style")
    client.generate("a cat", adapters=["blend-cache-style:0.7"], steps=1, seed=1)
    used = engine.stats().plan_bytes
    assert used > 0
    assert client.server_info().cache.plan_bytes == used
    assert client.list_resident().cache.plan_bytes == used  # the same CacheStats message

    shown = _info_output(running.address)
    assert "blend cache" in shown and "(materialized blends)" in shown, shown


def test_plan_cache_mb_is_shown_by_loraloom_info(tmp_path):
    from server.api.app import ServerThread
    from server.bootstrap import build_service
    from server.client import Client

    config = micro_config(tmp_path / "home", plan_cache_mb=64)
    with ServerThread(config, build_service) as running, Client(running.address, timeout=120) as client:
        assert running.server.service.engine.plan_capacity_bytes == 64 * MiB
        assert client.server_info().cache.plan_capacity_bytes == 64 * MiB
        lines = [
            line for line in _info_output(running.address).splitlines() if line.startswith("blend cache")
        ]
    assert len(lines) == 1 and lines[0].endswith("of 64.0 MiB (materialized blends)"), lines
