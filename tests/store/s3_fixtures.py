"""moto's S3 server over real HTTP on 127.0.0.1 (no S3-compatible server can be installed here).

``from tests.store.s3_fixtures import moto_endpoint, s3_settings  # noqa: F401`` in a test module.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from adapters.store.s3 import S3Settings

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "loraloom-test",
    "AWS_SECRET_ACCESS_KEY": "loraloom-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """The URL of a moto S3 server thread for the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture()
def s3_settings(moto_endpoint: str, monkeypatch) -> S3Settings:
    """A fresh bucket on the moto server; AWS_* credentials set in the environment for boto3."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    bucket = f"loraloom-{secrets.token_hex(4)}"
    s3_client(moto_endpoint).create_bucket(Bucket=bucket)
    return S3Settings(bucket=bucket, prefix="blobs/", endpoint_url=moto_endpoint, cache_bytes=1 << 20)
