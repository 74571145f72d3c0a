"""The store's PostgreSQL stops mid-run under a real server (a cluster of this test's own).

Calls that need the database answer UNAVAILABLE saying so (never INTERNAL); Generate with
adapters already resolved and resident keeps working on their last resolution, however old
(stale-if-error, logged once); when the database is back everything works again.
"""

from __future__ import annotations

import logging
import time

import pytest

from adapters import errors
from server.client import Client
from tests.api.helpers import adapter_bytes, micro_config
from tests.api.test_metrics import scrape, value
from tests.store.pgcluster import bindir_or_skip, throwaway_cluster

PROMPT = "a red circle"
TTL_S = 0.2


@pytest.mark.postgres
def test_a_database_outage_is_unavailable_while_resolved_adapters_keep_generating(
    tmp_path, micro_shapes, caplog
):
    from server.api.app import ServerThread

    with throwaway_cluster(bindir_or_skip()) as cluster:
        config = micro_config(
            tmp_path / "home", store_db_url=cluster.url, resolve_ttl_s=TTL_S, metrics_port=0
        )
        with ServerThread(config) as running, Client(running.address, timeout=60) as client:
            ink = client.upload_adapter(adapter_bytes(micro_shapes, seed=1), "ink", aliases=["stable"])
            client.upload_adapter(adapter_bytes(micro_shapes, seed=2), "neon")
            blend = ["ink@stable:0.6", "neon:0.4"]
            before = client.generate(PROMPT, adapters=blend, steps=2, seed=3)
            client.generate(PROMPT, adapters=["neon:0.5"], steps=1, seed=1)

            cluster.stop()
            time.sleep(2 * TTL_S)  # every cached resolution has expired
            with caplog.at_level(logging.WARNING, logger="server.engine.resolvers"):
                for _ in range(3):
                    during = client.generate(PROMPT, adapters=blend, steps=2, seed=3)
                    assert during.images[0].data == before.images[0].data
                    assert [a.ref for a in during.parameters.adapters] == [
                        a.ref for a in before.parameters.adapters
                    ]
                events = []
                client.generate(PROMPT, adapters=["neon:0.5"], steps=1, seed=1, on_event=events.append)
                assert events

                clay = adapter_bytes(micro_shapes, seed=3)
                needs_the_database = {
                    "UploadAdapter": lambda: client.upload_adapter(clay, "clay"),
                    "ListAdapters": lambda: client.list_adapters(),
                    "GetAdapter": lambda: client.get_adapter("ink"),
                    "SetAlias": lambda: client.set_alias("ink", "stable", 1),
                    "DeleteAdapter": lambda: client.delete_adapter("neon@1"),
                    "Generate": lambda: client.generate(PROMPT, adapters=["ink@1:0.5"], steps=1),
                    "LoadAdapter": lambda: client.load_adapter("clay"),
                }
                for method, call in needs_the_database.items():
                    with pytest.raises(errors.Unavailable, match="database is unreachable.*retry") as caught:
                        call()
                    assert type(caught.value) is errors.Unavailable, method  # answered, not Unreachable
            outage = [r for r in caplog.records if r.name == "server.engine.resolvers"]
            assert len(outage) == 1 and "unreachable" in outage[0].getMessage()

            samples = scrape(running)
            for method in needs_the_database:
                assert value(samples, "loraloom_requests_total", method=method, code="INTERNAL") == 0
            assert value(samples, "loraloom_requests_total", method="Generate", code="UNAVAILABLE") == 1

            cluster.start()
            assert client.get_adapter("ink").sha256 == ink.sha256
            assert client.upload_adapter(clay, "clay").ref == "clay@1"
            assert client.generate(PROMPT, adapters=["clay:0.5", "ink@1:0.5"], steps=1, seed=1).images
            assert [item.name for item in client.list_adapters().adapters] == ["clay", "ink", "neon"]
