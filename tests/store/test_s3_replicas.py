"""Two ``loraloom serve`` processes sharing one PostgreSQL and one S3 bucket (moto over HTTP).

An adapter uploaded through replica A is used by a Generate on replica B within 5 s;
replica A killed mid-upload leaves no visible partial version.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time

import pytest

from adapters import errors
from server.client import Client
from tests.api.helpers import adapter_bytes
from tests.serving import Serving
from tests.store import s3_fixtures
from tests.store.s3_fixtures import CREDENTIALS

moto_endpoint = s3_fixtures.moto_endpoint
s3_settings = s3_fixtures.s3_settings


pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture()
def replicas(postgres_url, s3_settings, tmp_path):
    base = {
        **os.environ,
        **CREDENTIALS,
        "LORALOOM_MODEL": "micro",
        "LORALOOM_DEFAULT_STEPS": "2",
        "LORALOOM_STORE_DB_URL": postgres_url,
        "LORALOOM_S3_BUCKET": s3_settings.bucket,
        "LORALOOM_S3_ENDPOINT": s3_settings.endpoint_url,
        "LORALOOM_S3_PREFIX": "shared",
        "LORALOOM_LOG_LEVEL": "INFO",
    }
    started = [Serving(env={**base, "LORALOOM_HOME": str(tmp_path / name)}) for name in ("a", "b")]
    clients = []
    try:
        for replica in started:
            client = Client(replica.address(), timeout=60)
            clients.append(client)
        for client in clients:
            client.wait_ready(120)
        yield list(zip(started, clients, strict=True))
    finally:
        for client in clients:
            client.close()
        for replica in started:
            replica.kill()


def test_upload_on_a_is_served_by_b_then_killed_upload_leaves_nothing(replicas, micro_shapes):
    (a, client_a), (_b, client_b) = replicas
    data = adapter_bytes(micro_shapes, seed=5)
    uploaded = client_a.upload_adapter(data, "shared-style")
    started = time.monotonic()
    result = None
    while result is None:
        try:
            result = client_b.generate("a red circle", adapters=["shared-style:0.8"], seed=1, steps=2)
        except errors.NotFound:
            assert time.monotonic() - started < 5, "replica B did not see the adapter within 5 s"
            time.sleep(0.2)
    visible_after = time.monotonic() - started
    assert visible_after < 5
    assert result.images and result.parameters.adapters[0].version == uploaded.version
    print(f"replica B generated with replica A's upload {visible_after:.2f}s after it returned")

    # Replica A killed mid-upload: nothing half-written becomes visible to B.
    from server.api.pb.loraloom.v1 import service_pb2_grpc
    from server.client import convert

    other = adapter_bytes(micro_shapes, seed=6)
    digest = hashlib.sha256(other).hexdigest()

    def messages():
        for index, message in enumerate(convert.upload_messages("half", other, digest, chunk_size=512)):
            if index == 2:
                os.kill(a.process.pid, signal.SIGKILL)
                a.process.wait(10)
            yield message

    stub = service_pb2_grpc.LoraloomStub(client_a._channel)
    with pytest.raises(Exception):  # noqa: B017 - the connection drops: any grpc error
        stub.UploadAdapter(messages(), timeout=30)
    with pytest.raises(errors.NotFound):
        client_b.get_adapter("half")
    assert [info.name for info in client_b.list_adapters().adapters] == ["shared-style"]
