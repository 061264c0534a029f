"""Fixtures of the sink tests: a local Events API server shared by the session,
unique data source names, a fake clock, a scripted HTTP(S) server for protocol
edge cases the local server does not produce, and a self-signed certificate."""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import re

import pytest
from sink_testlib import TOKEN, FakeTime, ScriptedServer

from tinybird_emulator import LocalServer

_names = itertools.count(1)


@pytest.fixture(scope="session")
def _local_server(tmp_path_factory):
    with LocalServer(
        data_dir=tmp_path_factory.mktemp("tinybird-local"), token=TOKEN, port=0, rate_limit_rps=None
    ) as server:
        yield server


@pytest.fixture
def server(_local_server):
    """The session's local server, without fault rules before and after the test."""
    _local_server.clear_faults()
    yield _local_server
    _local_server.clear_faults()


@pytest.fixture
def datasource(request) -> str:
    """A data source name of its own for each test."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:60]
    return f"t{next(_names)}_{base}"


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def scripted():
    with ScriptedServer() as s:
        yield s


@pytest.fixture(scope="session")
def self_signed_cert(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1: (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)
