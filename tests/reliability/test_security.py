"""Security: the token never shows, TLS is verified, plain http to a remote host is
refused, and the local server compares tokens in constant time, enforces scopes,
validates names, bounds decoded bodies and keeps its SQL endpoint read-only.

What ``tests/sink/test_events_api.py`` and ``tests/emulator/`` already check at
the unit or HTTP level is checked here through whole pipelines, or for the cases
they leave out.
"""

from __future__ import annotations

import collections
import datetime
import glob
import hashlib
import http.server
import inspect
import ipaddress
import json
import logging
import os
import pickle
import re
import ssl
import threading
import time
import traceback
import zlib

import apache_beam as beam
import pytest
import requests
import zstandard
from apache_beam.metrics.metric import MetricsFilter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_testlib import events, make_pipeline, quick_retries, run, sink
from shared_testlib import TOKEN, dead_letters_in

import tinybird_emulator._tokens as tokens_module
from sinks.tinybird import DeliveryError, RetryPolicy, WriteToTinybird
from sinks.tinybird._events_api import ClientSettings, EventsApiClient
from sinks.tinybird._token import TokenSource
from tinybird_emulator import LocalServer

pytestmark = pytest.mark.timeout(120)

WRONG_TOKEN = "p.WRONG-secret-token-3e7a0f44c1"
SECRETS = (TOKEN, WRONG_TOKEN)


def _assert_no_secret(text, where: str) -> None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for secret in SECRETS:
        assert secret not in text, f"a token is in {where}"
    # Also a token cut at a line break or shown in part.
    for secret in SECRETS:
        assert secret[5:25] not in text, f"part of a token is in {where}"


def _all_metrics_text(result) -> str:
    """Every metric of a run, names and values, as text."""
    query = result.metrics().query(MetricsFilter())
    parts = []
    for kind in ("counters", "distributions", "gauges", "string_sets", "bounded_tries"):
        for metric in query.get(kind, []):
            parts.append(f"{metric.key!r} {metric.committed!r} {metric.attempted!r}")
    return "\n".join(parts)


class _Reprs(beam.pipeline.PipelineVisitor):
    """Collects the repr and str of every transform and DoFn of a pipeline."""

    def __init__(self) -> None:
        self.texts = []

    def _add(self, node) -> None:
        transform = node.transform
        if transform is None:
            return
        self.texts += [repr(transform), str(transform), repr(vars(transform))]
        fn = getattr(transform, "fn", None)
        if fn is not None:
            self.texts += [repr(fn), str(fn), repr(vars(fn))]

    def enter_composite_transform(self, node) -> None:
        self._add(node)

    def visit_transform(self, node) -> None:
        self._add(node)


def test_the_token_never_shows_in_logs_files_errors_reprs_or_metrics(tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    faults = [
        {"status": 500, "when": "before", "probability": 0.1, "seed": 1},
        {"status": 500, "when": "after", "probability": 0.05, "seed": 2},
        {"reset": True, "when": "before", "probability": 0.05, "seed": 3},
        {"status": 503, "latency_secs": 1.0, "when": "before", "probability": 0.05, "seed": 4},
    ]
    texts = []
    with LocalServer(data_dir=tmp_path / "server", token=TOKEN, rate_limit_rps=None, faults=faults) as server:
        good = sink(server, "secrets", read_timeout_secs=0.3, max_batch_bytes=4096,
                    dead_letter_path=f"{tmp_path}/dlq/",
                    retry_policy=quick_retries(max_attempts=2))
        wrong = sink(server, "secrets", token=WRONG_TOKEN, dead_letter_path=f"{tmp_path}/dlq_wrong/")
        p = make_pipeline()
        elements = p | beam.Create(events(6000), reshuffle=False)
        elements | "Good" >> good
        elements | "Wrong" >> wrong
        visitor = _Reprs()
        p.visit(visitor)
        texts += visitor.texts
        result = p.run()
        result.wait_until_finish()
        texts.append(_all_metrics_text(result))
        counters = collections.Counter()
        for metric in result.metrics().query(MetricsFilter().with_namespace("tinybird"))["counters"]:
            if metric.key.step.startswith("Good/"):
                counters[metric.key.metric.name] += metric.committed

        # A run that fails on purpose: the error names the failure, not the token.
        with pytest.raises(Exception) as raised:
            run(lambda q: q | beam.Create(events(10), reshuffle=False) | sink(
                server, "secrets", token=WRONG_TOKEN, raise_on_failure=True))
        texts += [str(raised.value), repr(raised.value), "".join(traceback.format_exception(raised.value))]
        assert "403" in str(raised.value) and DeliveryError.__name__ in str(raised.value)
        log_path = server.log_path
        with open(log_path, "rb") as fh:
            texts.append(fh.read())

    # The run did meet every kind of failure, so the texts searched are not empty of them.
    assert counters.get("retries_500", 0) > 0 and counters.get("retries_timeout", 0) > 0
    assert counters.get("retries_connection_error", 0) > 0
    letters = dead_letters_in(tmp_path / "dlq_wrong")
    assert len(letters) == 6000 and {(d.kind, d.status) for d in letters} == {("rejected", 403)}
    assert any("Tinybird secrets" in record.getMessage() for record in caplog.records)
    assert any(record.levelno == logging.DEBUG for record in caplog.records)

    for name in glob.glob(str(tmp_path / "dlq*" / "*")):
        with open(name, "rb") as fh:
            _assert_no_secret(fh.read(), f"dead-letter file {name}")
    _assert_no_secret(caplog.text, "the captured logs")
    for record in caplog.records:
        _assert_no_secret(record.getMessage(), f"log record {record.name}")
        if record.exc_info:
            _assert_no_secret("".join(traceback.format_exception(*record.exc_info)), "a logged exception")
    captured = capfd.readouterr()
    _assert_no_secret(captured.out + captured.err, "stdout/stderr")
    for number, text in enumerate(texts):
        _assert_no_secret(text, f"text #{number} (reprs, metrics, errors, server log)")


def test_the_token_is_not_in_reprs_of_configs_clients_or_errors():
    settings_ = ClientSettings(api_url="https://api.tinybird.co", datasource="events")
    client = EventsApiClient(settings_, token=TOKEN, retry_policy=RetryPolicy())
    try:
        shown = [
            repr(WriteToTinybird(datasource="events", token=TOKEN)),
            repr(vars(WriteToTinybird(datasource="events", token=TOKEN))),
            repr(TokenSource(value=TOKEN)), repr(settings_), repr(client), str(client),
            repr(client._transport._auth), repr(client._transport), repr(client._redactor), repr(RetryPolicy()),
            repr(DeliveryError(datasource="events", kind="rejected", status=403, message="m", rows=1)),
        ]
        with pytest.raises(TypeError) as raised:
            pickle.dumps(client)
        shown.append(str(raised.value))
        for bad in (TOKEN + "\n", " " + TOKEN):
            with pytest.raises(ValueError) as refused:
                EventsApiClient(settings_, token=bad, retry_policy=RetryPolicy())
            shown.append(str(refused.value))
    finally:
        client.close()
    for text in shown:
        _assert_no_secret(text, text[:60])


class _EchoingServer:
    """A raw-socket server on 127.0.0.1 that answers every request with a 400 that echoes
    the token: in a header line urllib3 cannot parse (it logs the raw bytes at WARNING)
    and in an error message where the token straddles the sink's 1,000-character cap."""

    def __init__(self, token: str) -> None:
        import socket

        body = json.dumps({"error": "x" * 970 + token + " is not valid"}).encode()
        self._answer = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n" % len(body) + b"Bearer " + token.encode() + b" \x01\r\n"
                        + b"X-Echo: " + token.encode() + b"\r\n\r\n" + body)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stopped.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        conn.settimeout(10)
        with conn, conn.makefile("rb") as reader:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline(65537)
                    if not line:
                        return
                    head += line
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                reader.read(int(length.group(1)) if length else 0)
                conn.sendall(self._answer)


def test_a_server_echoing_the_token_puts_it_in_no_log_record_file_or_error(tmp_path, caplog, capfd):
    """Issue 11, class 8: the server's text is scrubbed before it is capped, and the
    HTTP stack's own log records (urllib3's "Failed to parse headers" WARNING, with the
    raw header bytes) pass through the sink's redaction while the sink runs."""
    caplog.set_level(logging.DEBUG)
    n = 300
    with _EchoingServer(TOKEN) as server:
        counters, result = run(lambda p: p | beam.Create(events(n), reshuffle=False) | WriteToTinybird(
            datasource="echo", token=TOKEN, api_url=server.url, max_batch_bytes=4096, num_shards=1,
            retry_policy=quick_retries(), dead_letter_path=f"{tmp_path}/dlq/"))
        with pytest.raises(Exception) as raised:
            run(lambda p: p | beam.Create(events(5), reshuffle=False) | WriteToTinybird(
                datasource="echo", token=TOKEN, api_url=server.url, raise_on_failure=True,
                retry_policy=quick_retries()))
    letters = dead_letters_in(tmp_path / "dlq")
    assert sorted(json.loads(d.line)["id"] for d in letters) == list(range(n))  # every id accounted for
    assert {(d.kind, d.status) for d in letters} == {("rejected", 400)}
    assert all(d.message.startswith("HTTP 400: xxx") and len(d.message) <= 1010 for d in letters)
    assert counters["dead_letters_rejected"] == n
    assert any("Failed to parse headers" in r.getMessage() for r in caplog.records), "urllib3 logged nothing"
    assert "DeliveryError" in str(raised.value) or "400" in str(raised.value)
    texts = [caplog.text, str(raised.value), "".join(traceback.format_exception(raised.value)),
             _all_metrics_text(result)]
    texts += [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    for name in glob.glob(str(tmp_path / "dlq" / "*")):
        with open(name, "rb") as fh:
            texts.append(fh.read())
    captured = capfd.readouterr()
    texts.append(captured.out + captured.err)
    for number, text in enumerate(texts):
        _assert_no_secret(text, f"text #{number} (logs, errors, metrics, dead-letter files)")


@pytest.mark.parametrize("bad", [
    TOKEN + "\x7f", TOKEN + "\x00", "\x01" + TOKEN, TOKEN[:12] + "\x1b" + TOKEN[12:], TOKEN + "\u00e9",
])
def test_a_token_with_a_control_character_is_refused_before_anything_is_sent(server, bad):
    """A malformed Authorization header is echoed by HTTP servers (aiohttp's answer is
    ``b'Authorization: Bearer <token>\\x7f'``) in a form that escapes the sink's
    scrubbing; such a token must never be sent: refused in setup(), no request made."""
    with pytest.raises(ValueError, match="token must be a non-empty string without whitespace") as refused:
        EventsApiClient(ClientSettings(api_url=server.url, datasource="events"), token=bad,
                        retry_policy=RetryPolicy())
    _assert_no_secret(str(refused.value), "the error")
    with pytest.raises(Exception) as failed:
        run(lambda p: p | beam.Create(events(3), reshuffle=False) | sink(server, "control_chars", token=bad))
    assert "token must be" in str(failed.value)
    _assert_no_secret(str(failed.value), "the pipeline's error")
    assert server.stats()["requests"]["total"] == 0


def test_a_token_read_from_the_environment_is_not_in_the_job_graph(monkeypatch):
    """``token_env`` (or ``token_secret``) keeps the token out of the pickled DoFns
    that travel with the job; ``token=`` necessarily travels with them."""
    monkeypatch.setenv("RELIABILITY_TOKEN", TOKEN)
    p = make_pipeline()
    p | beam.Create([{"id": 1}]) | WriteToTinybird(
        datasource="events", token_env="RELIABILITY_TOKEN", api_url="http://127.0.0.1:9")
    graph = p.to_runner_api()
    payloads = [graph.SerializeToString()]
    for transform in graph.components.transforms.values():
        payloads.append(transform.spec.payload)
    visitor = _Reprs()
    p.visit(visitor)
    for text in visitor.texts:
        _assert_no_secret(text, "a repr")
    for payload in payloads:
        _assert_no_secret(payload, "the job graph")
    # The sink's DoFns themselves, pickled (the job graph holds them base64-encoded).
    fns = [node.transform.fn for node in _par_dos(p) if type(node.transform.fn).__module__.startswith("sinks.")]
    assert {type(fn).__name__ for fn in fns} >= {"_EncodeAndBatchGlobalDoFn", "_PostDoFn"}
    for fn in fns:
        _assert_no_secret(pickle.dumps(fn), f"the pickled {type(fn).__name__}")


def _par_dos(p):
    found = []

    class Visitor(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            if isinstance(node.transform, beam.ParDo):
                found.append(node)

    p.visit(Visitor())
    return found


# -- plain http and TLS ------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "http://example.com", "http://api.tinybird.co", "http://10.0.0.1:8080", "http://[2001:db8::1]/",
    "HTTP://example.com",
])
def test_plain_http_to_a_remote_host_is_refused_when_the_sink_is_built(url):
    with pytest.raises(ValueError) as refused:
        WriteToTinybird(datasource="events", token=TOKEN, api_url=url)
    assert "allow_insecure_http" in str(refused.value)
    _assert_no_secret(str(refused.value), "the error")


@pytest.mark.parametrize("url", ["http://example.com", "http://10.0.0.1:8080"])
def test_allow_insecure_http_lets_the_sink_be_built_and_sends_nothing(url):
    write = WriteToTinybird(datasource="events", token=TOKEN, api_url=url, allow_insecure_http=True)
    p = make_pipeline()
    p | beam.Create([{"id": 1}]) | write  # built, never run: no traffic leaves this machine
    assert write._settings.events_url == f"{url.lower()}/v0/events?name=events"


@pytest.mark.parametrize("url", ["http://127.0.0.1:9", "http://localhost:9", "http://[::1]:9", "https://example.com"])
def test_loopback_http_and_https_need_no_permission(url):
    WriteToTinybird(datasource="events", token=TOKEN, api_url=url)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate; it answers 202 and records bodies."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    bodies = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "zstd":
                body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
            bodies.append(body)
            rows = body.count(b"\n")
            payload = json.dumps({"successful_rows": rows, "quarantined_rows": 0}).encode()
            self.send_response(202)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert_path), str(key_path))
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}", str(cert_path), bodies
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_tls_is_verified_by_default_and_a_custom_ca_bundle_is_used(tls_server, tmp_path):
    url, ca_bundle, bodies = tls_server
    n = 500

    def write(**options):
        return WriteToTinybird(datasource="tls", token=TOKEN, api_url=url, max_batch_bytes=4096,
                               num_shards=1, retry_policy=quick_retries(), **options)

    # Self-signed and no CA bundle: refused at the handshake, never retried, nothing sent.
    counters, _ = run(lambda p: p | beam.Create(events(n), reshuffle=False)
                      | write(dead_letter_path=f"{tmp_path}/dlq/"))
    letters = dead_letters_in(tmp_path / "dlq")
    assert len(letters) == n and bodies == []
    assert {(d.kind, d.status, d.attempts) for d in letters} == {("rejected", None, 1)}
    assert all("TLS certificate verification failed" in d.message and "ca_bundle_path" in d.message
               for d in letters)
    assert counters.get("retries", 0) == 0

    # With the server's CA: delivered.
    counters, _ = run(lambda p: p | beam.Create(events(n), reshuffle=False) | write(ca_bundle_path=ca_bundle))
    sent = sorted(json.loads(line)["id"] for body in bodies for line in body.split(b"\n") if line)
    assert sent == list(range(n))
    assert counters["rows_acknowledged"] == n


# -- the local server ----------------------------------------------------------------


def test_the_server_compares_token_digests_in_constant_time(tmp_path, monkeypatch):
    """Every lookup compares fixed-length digests with hmac.compare_digest, against
    every known token, whether it matches the first, the last or none."""
    source = inspect.getsource(tokens_module.TokenStore._match)
    loop = source.split("for stored, info in self._entries:")[1]
    assert "hmac.compare_digest" in source and "==" not in source
    assert "break" not in loop and "return" not in loop.split("return found")[0]
    store = tokens_module.TokenStore(str(tmp_path), admin_token=TOKEN)
    created = [store.create(name=f"t{k}", scopes=["DATASOURCE:APPEND"])[0] for k in range(3)]
    calls = []
    real = tokens_module.hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(tokens_module.hmac, "compare_digest", counting)
    for token in (TOKEN, created[0], created[-1], "x", WRONG_TOKEN * 10):
        calls.clear()
        store.lookup(token)
        # 4 known tokens; a miss is looked up twice (after re-reading the token file).
        assert len(calls) in (4, 8) and len(calls) == (4 if token in (TOKEN, *created) else 8), token
        assert set(calls) == {(32, 32)}  # SHA-256 digests: no length leaks through the comparison
    stored = (tmp_path / "tokens.json").read_text()
    assert all(token not in stored for token in created)
    assert all(hashlib.sha256(token.encode()).hexdigest() in stored for token in created)


def test_scopes_are_enforced_per_data_source_through_the_sink(server, tmp_path):
    allowed, other = "scoped_allowed", "scoped_other"
    for name in (allowed, other):
        requests.post(f"{server.url}/v0/events?name={name}&wait=true", data=b'{"id":-1}\n',
                      headers={"Authorization": f"Bearer {server.token}"}, timeout=10).raise_for_status()
    append_one = server.create_token(f"append_{int(time.time() * 1000)}", scopes=[f"DATASOURCE:APPEND:{allowed}"])
    read_only = server.create_token(f"read_{int(time.time() * 1000)}", scopes=["DATASOURCE:READ"])

    def build(p):
        elements = p | beam.Create(events(200), reshuffle=False)
        elements | "Allowed" >> sink(server, allowed, token=append_one, dead_letter_path=f"{tmp_path}/a/")
        elements | "Other" >> sink(server, other, token=append_one, dead_letter_path=f"{tmp_path}/b/")
        elements | "ReadOnly" >> sink(server, allowed, token=read_only, dead_letter_path=f"{tmp_path}/c/")
        elements | "NewSource" >> sink(server, "scoped_new", token=append_one, dead_letter_path=f"{tmp_path}/d/")

    run(build)
    server.flush()
    assert server.query(f"SELECT count(*) AS n FROM {allowed}") == [{"n": 201}]
    assert server.query(f"SELECT count(*) AS n FROM {other}") == [{"n": 1}]
    assert "scoped_new" not in server.datasources()
    assert dead_letters_in(tmp_path / "a") == []
    for folder, fragment in (("b", f"no DATASOURCE:APPEND scope for '{other}'"),
                             ("c", f"no DATASOURCE:APPEND scope for '{allowed}'"),
                             ("d", "does not exist and this token has no DATASOURCE:CREATE scope")):
        letters = dead_letters_in(tmp_path / folder)
        assert len(letters) == 200 and {(d.kind, d.status) for d in letters} == {("rejected", 403)}
        assert all(fragment in d.message for d in letters), (folder, letters[0].message)


_VALID_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(
    st.text(max_size=120),
    st.text(alphabet="abcXYZ_09;'\"-. /\\()*%", max_size=30),
    st.sampled_from(["sqlite_master", "SQLITE_x", "_emulator_x", "x_quarantine", "a" * 100, "a" * 101, "1a",
                     "events; DROP TABLE events", "events--", "événements", "ev\x00ents"]),
))
def test_data_source_names_are_validated_by_the_server(server, name):
    before = set(server.datasources())
    response = requests.post(
        f"{server.url}/v0/events", params={"name": name, "wait": "true"}, data=b'{"id": 1}\n',
        headers={"Authorization": f"Bearer {server.token}"}, timeout=10)
    reserved = name.endswith("_quarantine") or name.lower().startswith(("_emulator", "sqlite_"))
    # The local server's tables ignore case: a name that differs only in case from one it holds is refused.
    twin = any(other != name and other.casefold() == name.casefold() for other in before)
    if _VALID_NAME.match(name) and not reserved and not twin:
        assert response.status_code == 200, (name, response.text)
        assert set(server.datasources()) <= before | {name}
    else:
        assert response.status_code == 400, (name, response.text)
        assert list(response.json()) == ["error"]
        assert set(server.datasources()) == before


@pytest.mark.parametrize("name", ["events; DROP TABLE x", "1events", "", "ev-ents", "events&name=other", "ev/../x"])
def test_the_sink_refuses_an_invalid_data_source_name_when_built(name):
    with pytest.raises(ValueError, match="datasource must match"):
        WriteToTinybird(datasource=name, token=TOKEN, api_url="http://127.0.0.1:9")


def test_a_malformed_request_does_not_put_the_token_in_the_servers_log(tmp_path):
    import socket

    with LocalServer(data_dir=tmp_path / "server", token=TOKEN, rate_limit_rps=None) as server:
        host, port = server.url.rsplit("//", 1)[1].split(":")
        for raw in (
            f"POST /v0/events?name=x&token={TOKEN}\x01 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}",
            f"POST /v0/events?name=x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\x7f\r\n"
            "Content-Length: 2\r\n\r\n{}",
        ):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(raw.encode("latin-1"))
                assert sock.recv(1000).startswith(b"HTTP/1.0 400")
        with open(server.log_path, "rb") as fh:
            log = fh.read()
    _assert_no_secret(log, "the server's log")


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def _cpu_secs(pid: int) -> float:
    """CPU seconds (user and system) the process has used: unlike real time, a busy machine does not add to it."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_compression_bombs_get_413_quickly_with_bounded_memory(tmp_path):
    """A 33 KB zstd body that decodes to 1 GiB and a 0.6 MB gzip body that decodes to
    128 MiB: refused with 413 in well under a second of the server's CPU, the server's
    peak memory grows by about the limit (10 MB), not by the decoded size."""
    chunk = b"\0" * (1 << 20)
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    zstd_bomb = b"".join(compressor.compress(chunk) for _ in range(1024)) + compressor.flush()
    gzipper = zlib.compressobj(1, zlib.DEFLATED, 31)
    gzip_bomb = b"".join(gzipper.compress(chunk) for _ in range(128)) + gzipper.flush()
    assert len(zstd_bomb) < 100_000 and len(gzip_bomb) < 1_000_000
    with LocalServer(data_dir=tmp_path / "server", token=TOKEN, rate_limit_rps=None) as server:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        ok = requests.post(f"{server.url}/v0/events?name=bombed&wait=true", data=b'{"id":1}\n',
                           headers=headers, timeout=10)
        assert ok.status_code == 200
        baseline = _peak_rss_kib(server.pid)
        for encoding, bomb in (("zstd", zstd_bomb), ("gzip", gzip_bomb)):
            cpu_before, started = _cpu_secs(server.pid), time.monotonic()
            response = requests.post(f"{server.url}/v0/events?name=bombed", data=bomb,
                                     headers={**headers, "Content-Encoding": encoding}, timeout=30)
            cpu, elapsed = _cpu_secs(server.pid) - cpu_before, time.monotonic() - started
            assert response.status_code == 413, response.text
            assert response.json() == {"error": "decoded body is larger than the limit of 10000000 bytes"}
            # In CPU time, which a busy machine does not stretch: decoding the whole 1 GiB takes
            # about a second; stopping at the limit, some tens of milliseconds.
            assert cpu < 0.5, f"{encoding}: {cpu:.2f} s of CPU"
            grown_mib = (_peak_rss_kib(server.pid) - baseline) / 1024
            print(f"{encoding} bomb: 413 in {elapsed * 1000:.0f} ms ({cpu * 1000:.0f} ms of the server's CPU), "
                  f"server peak memory +{grown_mib:.0f} MiB")
            assert grown_mib < 64, f"{encoding}: the server's peak memory grew by {grown_mib:.0f} MiB"
        assert server.query("SELECT count(*) AS n FROM bombed") == [{"n": 1}]


@pytest.mark.parametrize("statement", [
    "REPLACE INTO {ds} (id) VALUES (5)",
    "INSERT OR IGNORE INTO {ds} (id) VALUES (5)",
    "WITH x AS (SELECT 5 AS id) INSERT INTO {ds} (id) SELECT id FROM x",
    "UPDATE {ds} SET id = 0 RETURNING id",
    "DELETE FROM {ds} RETURNING *",
    "ALTER TABLE {ds} ADD COLUMN z TEXT",
    "ALTER TABLE {ds} RENAME TO gone",
    "CREATE TRIGGER t AFTER INSERT ON {ds} BEGIN DELETE FROM {ds}; END",
    "CREATE TEMP TABLE t (a)",
    "CREATE VIEW v AS SELECT * FROM {ds}",
    "DROP TABLE IF EXISTS {ds}_quarantine",
    "DETACH DATABASE main",
    "SAVEPOINT s",
    "PRAGMA writable_schema = ON",
    "PRAGMA query_only = OFF",
    "SELECT * FROM pragma_table_info('{ds}')",
    "SELECT load_extension('/tmp/x.so')",
    "REINDEX",
    "ANALYZE",
    "SELECT id FROM {ds}; DELETE FROM {ds}",
    "SELECT 1 FORMAT JSON; DROP TABLE {ds}",
])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_the_sql_endpoint_refuses_every_write(server, statement, method):
    ds = "sql_target"
    if ds not in server.datasources():
        requests.post(f"{server.url}/v0/events?name={ds}&wait=true", data=b'{"id": 1, "s": "a"}\n',
                      headers={"Authorization": f"Bearer {server.token}"}, timeout=10).raise_for_status()
    before = server.datasources()[ds]
    # The server's own views (each data source's quarantine is one) are there before.
    objects = "SELECT type, name FROM sqlite_master WHERE type IN ('trigger', 'view') ORDER BY name"
    objects_before = server.query(objects)
    q = statement.format(ds=ds)
    url, headers = f"{server.url}/v0/sql", {"Authorization": f"Bearer {server.token}"}
    if method == "GET":
        response = requests.get(url, params={"q": q}, headers=headers, timeout=10)
    else:
        response = requests.post(url, data={"q": q}, headers=headers, timeout=10)
    assert response.status_code in (400, 403), (q, response.text)
    assert list(response.json()) == ["error"]
    assert server.datasources()[ds] == before
    assert server.query(f"SELECT id, s FROM {ds}") == [{"id": 1, "s": "a"}]
    assert server.query(objects) == objects_before
    assert server.query("SELECT count(*) AS n FROM sqlite_temp_master") == [{"n": 0}]
