"""TLS, mutual TLS, scoped bearer tokens and the plaintext health port, on a real server.

Certificates are made here with ``cryptography``: a CA, a server certificate for
127.0.0.1, a client certificate it signed, and one from an unrelated CA.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapters import errors
from adapters.errors import InvalidArgument
from server.api.auth import TokenTable
from server.client import Client
from server.client.errors import ServerError
from tests.api.helpers import adapter_bytes, micro_config

GEN, MGR = "gen-token-1234", "mgr-token-5678"


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool = False, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(folder: Path, stem: str, cert, key) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def make_pki(folder: Path) -> Pki:
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("loraloom test CA", ca_key, None, None, ca=True)
    rogue_ca = _cert("rogue CA", rogue_ca_key, None, None, ca=True)
    ca_path, _ = _write(folder, "ca", ca, ca_key)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    server = _write(
        folder, "server", _cert("127.0.0.1", server_key, ca.subject, ca_key, server=True), server_key
    )
    client = _write(folder, "client", _cert("client", client_key, ca.subject, ca_key), client_key)
    rogue = _write(folder, "rogue", _cert("rogue", rogue_key, rogue_ca.subject, rogue_ca_key), rogue_key)
    return Pki(ca_path, *server, *client, *rogue)


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """One server: mutual TLS, a tokens file with a generate and a manage token, health on its own port."""
    from server.api.app import ServerThread

    folder = tmp_path_factory.mktemp("pki")
    pki = make_pki(folder)
    tokens = folder / "tokens"
    tokens.write_text(f"# scoped tokens\n{GEN} generate\n{MGR} manage\n")
    config = micro_config(
        tmp_path_factory.mktemp("home"),
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        tokens_file=tokens,
        health_port=0,
    )
    with ServerThread(config) as running:
        yield running, pki


def connect(running, pki: Pki, token: str | None, *, client_cert: bool = True) -> Client:
    return Client(
        running.address,
        timeout=30,
        token=token,
        tls_ca=pki.ca,
        tls_cert=pki.client_cert if client_cert else None,
        tls_key=pki.client_key if client_cert else None,
    )


def test_no_token_and_bad_token_are_unauthenticated(secured, monkeypatch):
    running, pki = secured
    monkeypatch.delenv("LORALOOM_TOKEN", raising=False)
    for token in (None, "not-a-token"):
        with connect(running, pki, token) as client:
            for call in (client.server_info, lambda: client.generate("a circle", steps=1)):
                with pytest.raises(ServerError) as caught:
                    call()
                assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert "token" in str(caught.value)


def test_scopes(secured, micro_shapes):
    running, pki = secured
    data = adapter_bytes(micro_shapes, seed=7)
    with connect(running, pki, GEN) as gen, connect(running, pki, MGR) as mgr:
        with pytest.raises(ServerError) as caught:
            gen.upload_adapter(data, "scoped")
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED and "manage" in str(caught.value)
        uploaded = mgr.upload_adapter(data, "scoped")
        with pytest.raises(ServerError) as caught:
            mgr.generate("a circle", steps=1)
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED and "generate" in str(caught.value)
        result = gen.generate("a circle", steps=1, adapters=["scoped:0.5"], seed=2)
        assert result.images and result.parameters.adapters[0].version == uploaded.version
        events = list(gen.generate_stream("a circle", steps=1, seed=2))
        assert events
        for client in (gen, mgr):  # reads take either scope
            assert [info.name for info in client.list_adapters().adapters] == ["scoped"]
            assert client.server_info().base_model
        with pytest.raises(ServerError) as caught:
            gen.delete_adapter("scoped")
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert mgr.delete_adapter("scoped")


def test_mutual_tls_refuses_missing_and_foreign_client_certificates(secured):
    running, pki = secured
    with connect(running, pki, GEN, client_cert=False) as client, pytest.raises(errors.Unavailable):
        client.server_info(timeout=5)
    rogue = Client(
        running.address, timeout=5, token=GEN, tls_ca=pki.ca, tls_cert=pki.rogue_cert, tls_key=pki.rogue_key
    )
    with rogue, pytest.raises(errors.Unavailable):
        rogue.server_info()
    with Client(running.address, timeout=5, token=GEN) as plaintext, pytest.raises(errors.Unavailable):
        plaintext.server_info()
    with connect(running, pki, GEN) as client:
        assert client.server_info().base_model


def test_health_port_is_plaintext_and_needs_no_token(secured):
    running, _ = secured
    port = running.server.health_port
    assert port and port != running.server.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "loraloom.v1.Loraloom"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:  # only health lives there
            channel.unary_unary("/loraloom.v1.Loraloom/GetServerInfo")(b"", timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_token_table_parsing_and_secrets_not_logged(tmp_path):
    table = TokenTable.load(None, f"{GEN} generate; {MGR} manage,generate")
    assert table.scopes(GEN) == {"generate"} and table.scopes(MGR) == {"generate", "manage"}
    assert table.scopes("other") is None and not TokenTable.load(None, None)
    for bad in ("lonely", "tok admin", "a b c"):
        with pytest.raises(InvalidArgument):
            TokenTable.parse(bad)
    config = micro_config(tmp_path, tokens=f"{GEN} generate")
    assert GEN not in config.summary() and GEN not in repr(config)
    from server.settings import Settings

    settings = Settings.load({"LORALOOM_HEALTH_PORT": "8081", "LORALOOM_TLS_CERT": "/x.crt"})
    assert settings.api.health_port == 8081


def test_async_client_sends_token_over_mutual_tls(secured):
    import asyncio

    from server.client.aio import AsyncClient

    running, pki = secured

    async def main():
        options = dict(timeout=30, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
        async with AsyncClient(running.address, token=GEN, **options) as client:
            info = await client.server_info()
            result = await client.generate("a circle", steps=1, seed=3)
            streamed = await client.generate("a circle", steps=1, seed=3, on_event=lambda event: None)
        async with AsyncClient(running.address, token=MGR, **options) as manager:
            with pytest.raises(ServerError) as caught:
                await manager.generate("a circle", steps=1)
        return info, result, streamed, caught.value.code

    info, result, streamed, code = asyncio.run(main())
    assert info.base_model and result.images and streamed.images
    assert code == grpc.StatusCode.PERMISSION_DENIED
