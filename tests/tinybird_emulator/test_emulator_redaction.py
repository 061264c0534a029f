"""Tokens stay out of the server's log: the redaction filter, alone and behind a real server."""

from __future__ import annotations

import io
import logging
import re
import socket
import time

import pytest
from aiohttp.http_exceptions import BadHttpMessage, InvalidHeader, InvalidURLError

from tinybird_emulator import LocalServer
from tinybird_emulator._redact import (
    REDACTED,
    REQUEST_BYTES_NOT_LOGGED,
    RedactingFilter,
    redact,
    redacting_aiohttp_logs,
)

pytestmark = pytest.mark.timeout(60)

SECRET = "p.ADMIN-secret-0c5e2a91d7"
OTHER = "p.UNKNOWN-secret-77ab13f0e4"  # a token the server does not know


def _leaks(text: str) -> list:
    """Every 10-character part of a secret that ``text`` shows (a token may be cut anywhere)."""
    return [s[i:i + 10] for s in (SECRET, OTHER) for i in range(len(s) - 9) if s[i:i + 10] in text]


# -- redact() -------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    (f"b'Authorization: Bearer {OTHER}\\x7f'", f"b'Authorization: {REDACTED}'"),
    (f"{{'Authorization': 'Bearer {OTHER}', 'Host': 'x'}}", f"{{'Authorization': '{REDACTED}', 'Host': 'x'}}"),
    (f"authorization:{OTHER}\r\nHost: x", f"authorization:{REDACTED}\r\nHost: x"),
    (f"sent bearer {OTHER}, got 403", f"sent bearer {REDACTED}, got 403"),
    (f"b'POST /v0/events?name=x&token={OTHER}\\x01 HTTP/1.1'", f"b'POST /v0/events?name=x&token={REDACTED} HTTP/1.1'"),
    (f"/v0/sql?access_token={OTHER}&q=1", f"/v0/sql?access_token={REDACTED}&q=1"),
    (f"GET /x?token%3D{OTHER}", f"GET /x?token%3D{REDACTED}"),
    # The key percent-encoded: the server decodes it into token=.
    (f"/v0/events?name=x&%74oken={OTHER}", f"/v0/events?name=x&%74oken={REDACTED}"),
    (f"/v0/events?tok%65n={OTHER}&name=x", f"/v0/events?tok%65n={REDACTED}&name=x"),
    (f"/v0/events?%74%6F%6B%65%6E%3D{OTHER}", f"/v0/events?%74%6F%6B%65%6E%3D{REDACTED}"),
    (f"/v0/events?%54OKEN={OTHER}", f"/v0/events?%54OKEN={REDACTED}"),
])
def test_redact_removes_header_bearer_and_query_tokens(text, expected):
    assert redact(text) == expected


def test_redact_removes_known_secrets_anywhere_also_url_encoded():
    secret = "tb local/secret+value"
    text = "a tb local/secret+value b tb%20local%2Fsecret%2Bvalue c tb+local%2Fsecret%2Bvalue d"
    assert redact(text, [secret]) == f"a {REDACTED} b {REDACTED} c {REDACTED} d"
    assert redact(f"x{SECRET}y", [SECRET]) == f"x{REDACTED}y"


def test_redact_leaves_ordinary_text_and_short_secrets_alone():
    text = "stored 3 rows in events; Invalid header token: b'Bad Header'"
    assert redact(text, ["events", "short"]) == text


# -- RedactingFilter ------------------------------------------------------------------


def _logger_with_filter(redactor: logging.Filter) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(redactor)
    logger = logging.getLogger(f"test_redaction.{time.perf_counter_ns()}")
    logger.propagate = False
    logger.addHandler(handler)
    return logger, out


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


@pytest.mark.parametrize("exc", [
    # aiohttp's C parser: the header as it arrived, here cut in the middle of the token by a
    # TCP segment boundary, so that neither "Authorization" nor "Bearer" precedes it.
    BadHttpMessage(f"Invalid header value char:\n\n  b'{OTHER[7:]}\\x7f'\n  {' ' * 20}^"),
    BadHttpMessage(f"Invalid header value char:\n\n  b'Authorization: Bearer {OTHER}\\x7f'\n  {' ' * 55}^"),
    # aiohttp's pure-Python parser.
    InvalidHeader(f"Bearer {OTHER}\x7f".encode()),
    InvalidURLError(f"/v0/events?name=x&token={OTHER}\x01"),
])
def test_filter_keeps_aiohttp_parse_errors_but_not_the_request_bytes(exc):
    logger, out = _logger_with_filter(RedactingFilter([SECRET]))
    logger.error("Error handling request from %s", "127.0.0.1", exc_info=_raised(exc))
    text = out.getvalue()
    assert _leaks(text) == []
    assert text.startswith("ERROR test_redaction.")
    assert "Error handling request from 127.0.0.1\nTraceback (most recent call last):" in text
    assert f"aiohttp.http_exceptions.{type(exc).__name__}: 400, message:" in text
    assert REQUEST_BYTES_NOT_LOGGED in text or f"token={REDACTED}" in text


def test_filter_redacts_message_arguments_and_stack():
    logger, out = _logger_with_filter(RedactingFilter([SECRET]))
    logger.warning("admin is %s, header %r", SECRET, {"Authorization": f"Bearer {OTHER}"}, stack_info=True)
    text = out.getvalue()
    assert _leaks(text) == []
    assert text.startswith("WARNING test_redaction.")
    assert f"admin is {REDACTED}, header {{'Authorization': '{REDACTED}'}}\nStack (most recent call last):" in text


def test_filter_drops_arguments_that_do_not_fit_the_message():
    logger, out = _logger_with_filter(RedactingFilter([SECRET]))
    logger.error("one %s, two %s", SECRET)  # logging itself would print the arguments to stderr
    assert out.getvalue().endswith(": one %s, two %s [arguments not logged: they do not fit the message]\n")


def test_filter_leaves_records_without_secrets_untouched():
    redactor = RedactingFilter([SECRET])
    error = _raised(ValueError("nothing secret"))
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "stored %d rows", (3,), (ValueError, error, None))
    assert redactor.filter(record) is True
    assert (record.msg, record.args, record.exc_info[1], record.exc_text) == ("stored %d rows", (3,), error, None)


def test_redacting_aiohttp_logs_covers_aiohttp_loggers_only_while_active():
    server_logger = logging.getLogger("aiohttp.server")
    with redacting_aiohttp_logs([SECRET]) as redactor:
        assert redactor in server_logger.filters
        record = server_logger.makeRecord("aiohttp.server", logging.ERROR, __file__, 1, "token %s", (SECRET,), None)
        assert server_logger.filter(record) and record.getMessage() == f"token {REDACTED}"
    assert redactor not in server_logger.filters


# -- behind a real server ---------------------------------------------------------------


@pytest.mark.parametrize("parser", ["default", "python"])
def test_malformed_requests_get_400_and_leave_no_token_in_the_log(tmp_path, monkeypatch, parser):
    if parser == "python":
        monkeypatch.setenv("AIOHTTP_NO_EXTENSIONS", "1")
    requests_and_pauses = [
        [f"POST /v0/events?name=x&token={OTHER}\x01 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}"],
        [f"POST /v0/events?name=x&token={SECRET}\x01 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}"],
        # The query key percent-encoded, which the pure-Python parser logs as it came.
        [f"POST /v0/events?name=x&%74oken={OTHER}\x01 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}"],
        [f"POST /v0/events?name=x&tok%65n={SECRET}\x01 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}"],
        [f"POST /v0/events?name=x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\x7f\r\n"
         "Content-Length: 2\r\n\r\n{}"],
        # The header in two TCP segments: aiohttp's C parser quotes only the second one.
        [f"POST /v0/events?name=x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OTHER[:7]}",
         f"{OTHER[7:]}\x7f\r\nContent-Length: 2\r\n\r\n{{}}"],
    ]
    with LocalServer(data_dir=tmp_path, token=SECRET, rate_limit_rps=None) as server:
        host, port = server.url.rsplit("//", 1)[1].split(":")
        for parts in requests_and_pauses:
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for part in parts:
                    sock.sendall(part.encode("latin-1"))
                    time.sleep(0.2)
                assert sock.recv(1000).startswith(b"HTTP/1.0 400 Bad Request\r\n")
        assert server.query("SELECT 1 AS ok") == [{"ok": 1}]  # still serving
        with open(server.log_path, encoding="utf-8", errors="replace") as fh:
            log = fh.read()
    assert _leaks(log) == []
    assert log.count("ERROR aiohttp.server: Error handling request from 127.0.0.1") == len(requests_and_pauses)
    redacted_queries = re.findall("(?:token|%74oken|tok%65n)=" + re.escape(REDACTED), log)
    assert log.count(REQUEST_BYTES_NOT_LOGGED) + len(redacted_queries) == len(requests_and_pauses)

