"""The aiohttp application: /v0/events, /v0/tokens, /v0/sql, /v0/datasources, /_emulator/*.

Request flow of ``POST /v0/events``: name -> token -> request rate (429) -> queue
room (503) -> room for the body among those being received (503) -> body, bounded in size
(413) and time (408) -> byte rate (429) -> decode and validate
(400) -> fault rules -> enqueue (503 when full) -> 202, or 200 once committed.
Every response carries the ``X-RateLimit-*`` headers; every error body is
``{"error": "..."}``, except the text/plain 400 that aiohttp itself sends for a
request it cannot parse, before any of this code runs (its log record is redacted:
see ``_redact``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import fcntl
import logging
import math
import os
import re
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, NamedTuple

import orjson
from aiohttp import HttpVersion11, web

from tinybird_emulator._body import BodyError, decompress, json_array, parse_body
from tinybird_emulator._client_routes import ClientRoutes
from tinybird_emulator._config import ServerConfig
from tinybird_emulator._faults import WHEN_AFTER, FaultInjector, FiredFault, parse_rules
from tinybird_emulator._ratelimit import RateDecision, RateLimiter
from tinybird_emulator._redact import redacting_aiohttp_logs
from tinybird_emulator._schema import QUARANTINE_SUFFIX, Schema, infer_schema
from tinybird_emulator._storage import Store, WriteJob, WriteResult
from tinybird_emulator._tokens import TokenInfo, TokenStore

__all__ = ["READY_LINE_PREFIX", "DataDirInUse", "EventsApp", "serve"]

_LOG = logging.getLogger(__name__)

READY_LINE_PREFIX = "Tinybird local Events API listening on "
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
_RESERVED_PREFIXES = ("_emulator", "sqlite_")
_EVENTS_APP_KEY = web.AppKey("events_app", object) if hasattr(web, "AppKey") else "events_app"
# After a refused body has been read this far, the connection is closed instead.
_MAX_DRAIN_BYTES = 512 * 1024 * 1024


def _json(obj: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, headers=headers, content_type="application/json")


def _error(status: int, message: str, *, headers: Mapping[str, str] | None = None) -> web.Response:
    return _json({"error": message}, status=status, headers=headers)


class _Reset(Exception):
    """The connection was reset on purpose; there is no response."""


class _TooLarge(Exception):
    pass


def _token_of(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.query.get("token") or None


class _Decoded(NamedTuple):
    """What a request needs of its body once decoded (the rest is freed in the pool)."""

    lines: list[str]
    invalid: list[tuple[str, str]]
    new_schema: Schema | None
    cost_bytes: int
    # Of ``lines``, those that fit the schema (what the writer will store); None when not counted.
    fitting_rows: int | None = None
    # The schema ``fitting_rows`` was counted against.
    counted_schema: Schema | None = None


_fit_local = threading.local()


def _count_fitting(schema: Schema, lines: list[str]) -> int | None:
    """How many of ``lines`` the writer will store under ``schema``; None when SQLite
    refuses the array as a whole (the writer then goes row by row)."""
    conn = getattr(_fit_local, "conn", None)
    if conn is None:
        conn = _fit_local.conn = sqlite3.connect(":memory:")
    try:
        (count,) = conn.execute(schema.count_fitting_statement(), (json_array(lines),)).fetchone()
    except sqlite3.Error:
        return None
    return int(count)


def _decode(
    wire: bytes,
    encoding: str,
    max_bytes: int,
    fmt: str,
    name: str,
    known_schema: Schema | None,
    count_fitting: bool = False,
) -> _Decoded:
    """Decompresses and validates a body, infers the schema of a new data source, and
    when asked counts the rows that fit (the counts of a 202). Runs in the pool."""
    data = decompress(wire, encoding, max_bytes=max_bytes)
    if len(data) > max_bytes:
        raise BodyError(413, f"body is larger than the limit of {max_bytes} bytes")
    parsed = parse_body(data, fmt=fmt, keep_objects=known_schema is None)
    del data
    new_schema = None
    if known_schema is None and parsed.lines:
        new_schema = infer_schema(name, parsed.objects or [])
    fitting_rows = None
    schema = known_schema or new_schema
    if count_fitting and parsed.lines and schema is not None and schema.columns:
        fitting_rows = _count_fitting(schema, parsed.lines)
    else:
        schema = None
    return _Decoded(
        lines=parsed.lines,
        invalid=parsed.invalid,
        new_schema=new_schema,
        cost_bytes=parsed.array_chars + sum(len(raw) for raw, _ in parsed.invalid) + 256,
        fitting_rows=fitting_rows,
        counted_schema=schema,
    )


def _wants_wait(request: web.Request) -> bool:
    return request.query.get("wait", "").lower() in ("true", "1", "yes")


class Received(NamedTuple):
    """A decoded body and its size on the wire."""

    body: _Decoded
    received_bytes: int


class EventsApp:
    """State shared by the handlers of one server."""

    def __init__(self, config: ServerConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.tokens = TokenStore(config.data_dir, admin_token=config.admin_token)
        self.store = Store(config.data_dir, synchronous=config.synchronous, sql_timeout_secs=config.sql_timeout_secs)
        window = config.rate_limit_window_secs
        self.limiter = RateLimiter(
            requests_per_window=None if config.rate_limit_rps is None else config.rate_limit_rps * window,
            bytes_per_window=(
                None if config.rate_limit_bytes_per_sec is None else int(config.rate_limit_bytes_per_sec * window)
            ),
            window_secs=window,
            clock=clock,
        )
        self.faults = FaultInjector(config.faults)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="emulator-decode")
        self._decode_sem: asyncio.Semaphore | None = None
        # Bytes of request bodies being received or waiting for a decode slot (each request's
        # Content-Length, or max_body_bytes when it has none): bounded by queue_max_bytes.
        self._held_bytes = 0
        # The schema of the first job queued for a data source not committed yet.
        # Requests that come meanwhile reuse it instead of parsing their whole body
        # into objects and inferring again: the writer creates the data source with
        # the first job's schema anyway.
        self._pending_schemas: dict[str, Schema] = {}
        # Jobs queued with the pending schema of each name: when the last has committed or
        # failed, the schema goes (a failed creation leaves no data source, nor its schema).
        self._pending_jobs: collections.Counter[str] = collections.Counter()
        self._started = clock()
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.by_status: dict[str, int] = collections.Counter()
        self.rows_after_faults = 0
        self._rows_base = (self.store.rows_stored, self.store.rows_quarantined)

    # -- app ---------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=self.config.max_body_bytes)
        app[_EVENTS_APP_KEY] = self
        app.router.add_post("/v0/events", self.post_events, expect_handler=self._expect_continue)
        app.router.add_post("/v0/tokens", self.post_tokens)
        app.router.add_get("/v0/sql", self.sql)
        app.router.add_post("/v0/sql", self.sql)
        app.router.add_get("/v0/datasources", self.get_datasources)
        ClientRoutes(self).add_to(app)
        app.router.add_get("/_emulator/faults", self.get_faults)
        app.router.add_put("/_emulator/faults", self.put_faults)
        app.router.add_delete("/_emulator/faults", self.delete_faults)
        app.router.add_get("/_emulator/stats", self.get_stats)
        app.router.add_delete("/_emulator/stats", self.delete_stats)
        app.router.add_post("/_emulator/flush", self.flush)
        app.router.add_get("/_emulator/health", self.health)
        app.on_response_prepare.append(self._add_rate_headers)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        is_events = request.path == "/v0/events"
        try:
            response = await handler(request)
        except _Reset:
            if is_events:
                self.by_status["reset"] += 1
            # The transport is already aborted: aiohttp drops whatever is returned.
            return web.Response(status=500)
        except web.HTTPException as exc:
            response = _error(exc.status, exc.reason or "error", headers={"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None)
        except asyncio.CancelledError:
            raise
        except Exception:
            _LOG.exception("unexpected error on %s %s", request.method, request.path)
            response = _error(500, "unexpected error in the local server")
        if is_events:
            self.by_status[str(response.status)] += 1
        return response

    async def _add_rate_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        decision: RateDecision | None = request.get("rate")
        if decision is None:
            name = request.query.get("name", "") if request.path == "/v0/events" else ""
            decision = self.limiter.peek(name if _NAME_RE.match(name) else "")
        for key, value in decision.headers().items():
            response.headers.setdefault(key, value)

    async def _expect_continue(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuses an announced oversized body before it is sent."""
        expect = request.headers.get("Expect", "").lower()
        if request.version != HttpVersion11:
            return None
        if expect != "100-continue":
            self.by_status["417"] += 1
            return _error(417, f"unsupported Expect header {expect!r}")
        length = request.content_length
        if length is not None and length > self.config.max_body_bytes:
            self.by_status["413"] += 1
            return _error(413, f"the body is larger than the limit of {self.config.max_body_bytes} bytes")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
        request.writer.output_size = 0  # type: ignore[union-attr]
        return None

    def auth(self, request: web.Request) -> TokenInfo | None:
        """The request's token (header or ``?token=``), None when unknown."""
        return self.tokens.lookup(_token_of(request))

    async def read_and_decode(self, request: web.Request, name: str, fmt: str) -> Received | web.Response:
        """Reads a body (413 past the limit, 408 past the deadline) and decodes it in the
        pool, for a data source that exists; an error answer when it cannot be used."""
        if self._decode_sem is None:
            self._decode_sem = asyncio.Semaphore(self.config.max_concurrent_decodes)
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        async with self._received(request) as wire:
            if isinstance(wire, web.Response):
                return wire
            async with self._decode_sem:
                try:
                    decoded = await asyncio.get_running_loop().run_in_executor(
                        self._pool, _decode, wire, encoding, self.config.max_body_bytes, fmt, name,
                        self.store.schema(name),
                    )
                except BodyError as exc:
                    return _error(exc.status, exc.message)
        return Received(decoded, len(wire))

    @contextlib.asynccontextmanager
    async def _received(self, request: web.Request) -> AsyncIterator[bytes | web.Response]:
        """``request``'s whole body (see :meth:`_receive`), held until the block ends (it waits
        there to be decoded); or the answer refusing it, a 503 when the bodies held already fill
        ``queue_max_bytes`` (each counted at its Content-Length; one body alone always has room)."""
        length = request.content_length
        size = self.config.max_body_bytes if length is None else min(length, self.config.max_body_bytes)
        if self._held_bytes and self._held_bytes + size > self.config.queue_max_bytes:
            drained = await self._drain(request)
            response = _error(503, "too many request bodies are being received; nothing was inserted, retry later")
            if not drained:
                _close_after(response)
            yield response
            return
        self._held_bytes += size
        try:
            yield await self._receive(request)
        finally:
            self._held_bytes -= size

    # -- /v0/events ----------------------------------------------------------

    async def post_events(self, request: web.Request) -> web.StreamResponse:
        name = request.query.get("name", "")
        refused = await self._refusal(request, name)
        if refused is not None:
            return refused
        fmt = request.query.get("format", "").lower()
        if fmt not in ("", "ndjson", "json"):
            return _error(400, f"unsupported format {fmt!r}; use ndjson or json")
        body = await self._events_body(request, name, fmt)
        if isinstance(body, web.StreamResponse):
            return body
        decoded, new_schema = body
        return await self._store_and_answer(request, name, decoded, new_schema)

    async def _refusal(self, request: web.Request, name: str) -> web.StreamResponse | None:
        """Name, token, request rate (429), queue room (503): the answer when one refuses."""
        if not name:
            return _error(400, "missing the 'name' parameter: the data source to append to")
        if (
            not _NAME_RE.match(name)
            or name.endswith(QUARANTINE_SUFFIX)
            or name.lower().startswith(_RESERVED_PREFIXES)
        ):
            return _error(
                400,
                "invalid data source name: use 1-100 characters of A-Z a-z 0-9 _, not starting with a digit, "
                "not ending in _quarantine",
            )
        info = self.auth(request)
        if info is None:
            return _error(403, "invalid or missing token")
        exists = self.store.schema(name) is not None
        if not exists and (clash := self._case_clash(name)) is not None:
            return clash
        if not exists and not info.can_create():
            return _error(
                403,
                f"the data source '{name}' does not exist and this token has no DATASOURCE:CREATE scope",
            )
        if not info.can_append(name):
            return _error(403, f"this token has no DATASOURCE:APPEND scope for '{name}'")
        decision = self.limiter.acquire_request(name)
        request["rate"] = decision
        if not decision.allowed:
            return _error(
                429, decision.reason, headers={"Retry-After": str(decision.retry_after_secs)}
            )
        jobs, nbytes = self.store.queued()
        if jobs >= self.config.queue_max_requests or nbytes >= self.config.queue_max_bytes:
            drained = await self._drain(request)
            response = _error(503, "the write queue is full; nothing was inserted, retry later")
            if not drained:
                _close_after(response)
            return response
        return None

    def _case_clash(self, name: str) -> web.Response | None:
        """The 400 for a new data source whose name is that of another but for case, one that
        exists or whose first job is queued; None when there is none."""
        clash = self.store.same_but_case(name, also=self._pending_schemas)
        if clash is None:
            return None
        # A limit of this server (SQLite table names ignore case), said plainly rather than
        # storing the rows in the other data source's table.
        return _error(
            400,
            f"the data source '{clash}' exists, and this local server cannot hold '{name}' beside it: "
            "its tables ignore case",
        )

    async def _events_body(
        self, request: web.Request, name: str, fmt: str
    ) -> tuple[_Decoded, Schema | None] | web.StreamResponse:
        """The body read (413, 408), paced by bytes (429) and decoded (400), with the schema
        of a new data source; or the answer refusing it."""
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if self._decode_sem is None:
            self._decode_sem = asyncio.Semaphore(self.config.max_concurrent_decodes)
        async with self._received(request) as wire:
            if isinstance(wire, web.Response):
                return wire
            byte_decision = self.limiter.acquire_bytes(name, len(wire))
            if not byte_decision.allowed:
                request["rate"] = byte_decision
                return _error(429, byte_decision.reason, headers={"Retry-After": str(byte_decision.retry_after_secs)})
            async with self._decode_sem:
                known_schema = self.store.schema(name) or self._pending_schemas.get(name)
                try:
                    decoded = await asyncio.get_running_loop().run_in_executor(
                        self._pool,
                        _decode,
                        wire,
                        encoding,
                        self.config.max_body_bytes,
                        fmt,
                        name,
                        known_schema,
                        not _wants_wait(request),
                    )
                except BodyError as exc:
                    return _error(exc.status, exc.message)
                del wire
                if self.store.schema(name) is not None:
                    return decoded, None
                if not decoded.lines:
                    return _error(400, f"cannot create the data source '{name}': the body holds no valid JSON object")
                new_schema = self._pending_schemas.get(name) or decoded.new_schema
                if new_schema is None or not new_schema.columns:
                    return _error(400, f"cannot create the data source '{name}': no column could be inferred")
                return decoded, new_schema

    async def _store_and_answer(
        self, request: web.Request, name: str, decoded: _Decoded, new_schema: Schema | None
    ) -> web.StreamResponse:
        """Fault rules, then the write: 202 at once, or 200 once committed (``wait``)."""
        loop = asyncio.get_running_loop()
        wait = _wants_wait(request)
        fault = self.faults.decide(name)
        if fault is not None and fault.rule.when != WHEN_AFTER:
            outcome = await self._apply_fault(request, fault)
            if outcome is not None:
                return outcome
            fault = None  # latency only: carry on

        must_wait = wait or fault is not None
        future: asyncio.Future | None = loop.create_future() if must_wait else None

        fails_after = fault is not None and (fault.rule.status is not None or fault.rule.reset)

        def done(result: WriteResult | BaseException) -> None:
            # Runs on the writer thread once the job is committed (or failed).
            if new_schema is not None:
                # Before the answer: a client told of a failed creation finds no schema left.
                loop.call_soon_threadsafe(self._creating_job_ended, name)
            if isinstance(result, WriteResult) and fault is not None and fails_after:
                self.faults.record_rows_stored_after(fault, result.successful_rows)
                loop.call_soon_threadsafe(self._count_after_rows, result.successful_rows)
            if future is not None:
                loop.call_soon_threadsafe(_resolve, future, result)

        if new_schema is not None and (clash := self._case_clash(name)) is not None:
            # Another request queued its twin while this one was being read or decoded.
            return clash
        job = WriteJob(
            name=name,
            lines=decoded.lines,
            invalid=decoded.invalid,
            new_schema=new_schema,
            cost_bytes=decoded.cost_bytes,
            done=done,
        )
        if not self.store.try_submit(
            job, max_jobs=self.config.queue_max_requests, max_bytes=self.config.queue_max_bytes
        ):
            return _error(503, "the write queue is full; nothing was inserted, retry later")
        if new_schema is not None:
            self._pending_schemas.setdefault(name, new_schema)
            self._pending_jobs[name] += 1
        fitting_rows = decoded.fitting_rows
        schema = self.store.schema(name) or self._pending_schemas.get(name)
        if future is None and schema is not None and schema != decoded.counted_schema:
            # Another request's schema creates the data source (both were decoded at once,
            # or this one waited on a fault's latency): the rows are stored against it.
            fitting_rows = await loop.run_in_executor(self._pool, _count_fitting, schema, job.lines)
        fitting = len(job.lines) if fitting_rows is None else fitting_rows
        del decoded
        if future is None:
            # The counts the writer will reach: rows that do not fit the schema are
            # quarantined as well as lines that are not JSON objects.
            return _json(
                {"successful_rows": fitting, "quarantined_rows": len(job.invalid) + len(job.lines) - fitting},
                status=202,
            )
        result = await asyncio.shield(future)
        if isinstance(result, BaseException):
            return _error(500, f"the write failed: {result}")
        if fault is not None:
            outcome = await self._apply_fault(request, fault)
            if outcome is not None:
                return outcome
        return _json(
            {"successful_rows": result.successful_rows, "quarantined_rows": result.quarantined_rows},
            status=200 if wait else 202,
        )

    def _creating_job_ended(self, name: str) -> None:
        """A job queued to create ``name`` committed or failed: the last one takes its pending schema away."""
        self._pending_jobs[name] -= 1
        if self._pending_jobs[name] <= 0:
            del self._pending_jobs[name]
            self._pending_schemas.pop(name, None)

    def _count_after_rows(self, rows: int) -> None:
        self.rows_after_faults += rows

    async def _apply_fault(self, request: web.Request, fault: FiredFault) -> web.StreamResponse | None:
        rule = fault.rule
        if rule.latency_secs:
            await asyncio.sleep(rule.latency_secs)
        if rule.reset:
            self._reset_connection(request)
            raise _Reset()
        if rule.status is None:
            return None
        headers = {}
        if rule.retry_after_secs is not None:
            headers["Retry-After"] = str(math.ceil(rule.retry_after_secs))
        message = rule.message or f"injected fault: rule {fault.index} ({rule.when})"
        return _error(rule.status, message, headers=headers)

    @staticmethod
    def _reset_connection(request: web.Request) -> None:
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                # Linger 0: close() sends RST, like a crashed server or a proxy reset.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        transport.abort()

    async def _receive(self, request: web.Request) -> bytes | web.Response:
        """The whole body, or the answer refusing it: 413 past ``max_body_bytes``, 408
        past ``body_read_timeout_secs``.

        Called before a decode slot is taken: a client that stalls mid-body holds its
        own connection only, and the deadline frees that one too.
        """
        limit = self.config.max_body_bytes
        deadline = asyncio.get_running_loop().time() + self.config.body_read_timeout_secs
        try:
            async with asyncio.timeout_at(deadline):
                return await self._read_body(request, limit)
        except _TooLarge:
            drained = await self._drain(request, deadline)
            response = _error(413, f"the body is larger than the limit of {limit} bytes")
        except TimeoutError:
            # RFC 9110 408: the server closes the connection; the client may resend
            # (the sink retries 408).
            drained = False
            response = _error(
                408,
                f"the body did not arrive within {self.config.body_read_timeout_secs:g} s; nothing was inserted",
            )
        if not drained:
            _close_after(response)
        return response

    @staticmethod
    async def _read_body(request: web.Request, limit: int) -> bytes:
        """The body; ``_TooLarge`` (the rest unread) past ``limit``."""
        length = request.content_length
        if length is not None and length > limit:
            raise _TooLarge()
        chunks = []
        total = 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                chunks.clear()
                raise _TooLarge()
            chunks.append(chunk)
        return b"".join(chunks)

    async def _drain(self, request: web.Request, deadline: float | None = None) -> bool:
        """Reads and drops the rest of a refused body, so that the client reads our answer;
        by ``deadline`` (loop time; ``body_read_timeout_secs`` from now by default). False
        when the body did not end by then (or is too long to drain): the answer must then
        close the connection."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.config.body_read_timeout_secs
        drained = 0
        try:
            async with asyncio.timeout_at(deadline):
                while drained < _MAX_DRAIN_BYTES:
                    chunk = await request.content.readany()
                    if not chunk:
                        return True
                    drained += len(chunk)
        except TimeoutError:
            pass
        return False

    async def _small_body(self, request: web.Request) -> bytes | web.Response:
        """The body of a request other than an append (at most ``max_body_bytes``, aiohttp's
        ``client_max_size``), by ``body_read_timeout_secs``: past it 408, and the connection closes."""
        try:
            async with asyncio.timeout(self.config.body_read_timeout_secs):
                return await request.read()
        except TimeoutError:
            response = _error(408, f"the body did not arrive within {self.config.body_read_timeout_secs:g} s")
            _close_after(response)
            return response

    # -- /v0/tokens ----------------------------------------------------------

    async def post_tokens(self, request: web.Request) -> web.StreamResponse:
        info = self.auth(request)
        if info is None or not info.is_admin:
            return _error(403, "creating tokens needs an ADMIN token")
        name = request.query.get("name", "")
        scopes = request.query.getall("scope", [])
        try:
            token, created = await asyncio.get_running_loop().run_in_executor(
                None, lambda: self.tokens.create(name=name, scopes=scopes)
            )
        except ValueError as exc:
            return _error(400, str(exc))
        return _json({"token": token, "name": created.name, "scopes": sorted(str(s) for s in created.scopes)})

    # -- reads ---------------------------------------------------------------

    async def sql(self, request: web.Request) -> web.StreamResponse:
        info = self.auth(request)
        if info is None:
            return _error(403, "invalid or missing token")
        readable = info.readable()
        if readable is not None and not readable:
            return _error(403, "this token has no DATASOURCE:READ scope")
        q = request.query.get("q")
        if q is None and request.method == "POST":
            body = await self._small_body(request)
            if isinstance(body, web.Response):
                return body
            if request.content_type == "application/x-www-form-urlencoded":
                q = (await request.post()).get("q")  # type: ignore[assignment]  # parses the body read above
            else:
                q = body.decode("utf-8", "replace")
        status, content_type, body = await asyncio.wrap_future(
            self.store.submit_sql(None if q is None else str(q), readable=readable)
        )
        kind, _, charset = content_type.partition("; charset=")
        return web.Response(body=body, status=status, content_type=kind, charset=charset or None)

    async def get_datasources(self, request: web.Request) -> web.StreamResponse:
        info = self.auth(request)
        if info is None:
            return _error(403, "invalid or missing token")
        readable = info.readable()
        sources = [d for d in self.store.datasources() if readable is None or d["name"] in readable]
        return _json({"datasources": sources})

    # -- /_emulator ----------------------------------------------------------

    def _admin(self, request: web.Request) -> web.Response | None:
        info = self.auth(request)
        if info is None or not info.is_admin:
            return _error(403, "this endpoint needs an ADMIN token")
        return None

    async def get_faults(self, request: web.Request) -> web.StreamResponse:
        denied = self._admin(request)
        if denied is not None:
            return denied
        return _json({"rules": self.faults.rules(), "state": self.faults.snapshot()})

    async def put_faults(self, request: web.Request) -> web.StreamResponse:
        denied = self._admin(request)
        if denied is not None:
            return denied
        body = await self._small_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            rules = parse_rules(orjson.loads(body))
        except (orjson.JSONDecodeError, ValueError) as exc:
            return _error(400, f"invalid fault rules: {exc}")
        self.faults.set_rules(rules)
        _LOG.info("fault rules set: %d rule(s)", len(rules))
        return _json({"rules": self.faults.rules()})

    async def delete_faults(self, request: web.Request) -> web.StreamResponse:
        denied = self._admin(request)
        if denied is not None:
            return denied
        self.faults.set_rules(())
        return _json({"rules": []})

    def stats(self) -> dict[str, Any]:
        """Counters since the start or the last ``DELETE /_emulator/stats``.

        ``requests.by_status``: /v0/events answers by status code (``"reset"`` for
        connections reset by a fault); ``rows.stored`` / ``rows.quarantined``:
        rows committed; ``rows.stored_by_after_faults``: rows committed for
        requests whose client got an ``after`` failure (the duplicates a retrying
        client will cause); ``faults``: per rule, requests matched, times fired and
        rows stored behind its failures; ``queue``: accepted, uncommitted work.
        """
        jobs, nbytes = self.store.queued()
        return {
            "requests": {"total": sum(self.by_status.values()), "by_status": dict(self.by_status)},
            "rows": {
                "stored": self.store.rows_stored - self._rows_base[0],
                "quarantined": self.store.rows_quarantined - self._rows_base[1],
                "stored_by_after_faults": self.rows_after_faults,
            },
            "faults": self.faults.snapshot(),
            "queue": {
                "requests": jobs,
                "bytes": nbytes,
                "max_requests": self.config.queue_max_requests,
                "max_bytes": self.config.queue_max_bytes,
                "bodies_held_bytes": self._held_bytes,
            },
            "commits": self.store.commits,
            "uptime_secs": self.clock() - self._started,
        }

    async def get_stats(self, request: web.Request) -> web.StreamResponse:
        denied = self._admin(request)
        if denied is not None:
            return denied
        return _json(self.stats())

    async def delete_stats(self, request: web.Request) -> web.StreamResponse:
        denied = self._admin(request)
        if denied is not None:
            return denied
        self._reset_stats()
        return _json(self.stats())

    async def flush(self, request: web.Request) -> web.StreamResponse:
        """Answers once everything accepted before it is committed."""
        denied = self._admin(request)
        if denied is not None:
            return denied
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        job = WriteJob(
            name="",
            lines=[],
            invalid=[],
            new_schema=None,
            cost_bytes=0,
            done=lambda result: loop.call_soon_threadsafe(_resolve, future, result),
        )
        self.store.submit_marker(job)
        await future
        return _json({"flushed": True})

    async def health(self, request: web.Request) -> web.StreamResponse:
        return _json({"status": "ok"})

    def close(self) -> None:
        self.store.close()
        self._pool.shutdown(wait=True)


def _close_after(response: web.Response) -> None:
    """The connection closes once ``response`` is sent (``Connection: close``).

    Not ``protocol.force_close()``, which drops the transport before the answer is
    written: aiohttp sends the answer, then reads and ignores what the client still
    sends for its ``lingering_time`` (10 s), so that the client reads the answer
    rather than a reset, then closes.
    """
    response.force_close()


def _resolve(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Stops the server when stdin reaches EOF: the parent that started it is gone."""
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except (OSError, ValueError):
        pass
    _LOG.info("stdin closed: the parent process is gone, stopping")
    loop.call_soon_threadsafe(stop.set)


class DataDirInUse(RuntimeError):
    """Another server process holds the data dir."""


def _lock_data_dir(data_dir: str) -> Any:
    """An exclusive lock held for the life of the process (released even by SIGKILL)."""
    os.makedirs(data_dir, exist_ok=True)
    handle = open(os.path.join(data_dir, "server.lock"), "a+")  # noqa: SIM115 - held until the process ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DataDirInUse(f"another server is using the data dir {data_dir}") from None
    return handle


async def _serve_async(
    config: ServerConfig, *, announce: Callable[[str], None], stop_on_stdin_eof: bool = False
) -> None:
    lock = _lock_data_dir(config.data_dir)
    try:
        await _run(config, announce=announce, stop_on_stdin_eof=stop_on_stdin_eof)
    finally:
        lock.close()


async def _run(config: ServerConfig, *, announce: Callable[[str], None], stop_on_stdin_eof: bool) -> None:
    events = EventsApp(config)
    events.store.start()
    loop = asyncio.get_running_loop()
    runner = web.AppRunner(
        events.make_app(),
        access_log=None,  # access logs would show ?token= query strings
        auto_decompress=False,  # bodies are decompressed here, with a size cap
        max_line_size=65536,
        max_field_size=65536,
        handle_signals=False,
    )
    try:
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port, shutdown_timeout=10.0, backlog=1024)
        await site.start()
        port = config.port
        for sock in getattr(site._server, "sockets", None) or ():  # type: ignore[union-attr]
            port = sock.getsockname()[1]
            break
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if stop_on_stdin_eof:
            threading.Thread(target=_watch_stdin, args=(loop, stop), name="emulator-stdin", daemon=True).start()
        announce(f"{READY_LINE_PREFIX}http://{config.host}:{port}")
        await stop.wait()
        _LOG.info("stopping: finishing requests in flight, then committing the queue")
    finally:
        await runner.cleanup()
        await loop.run_in_executor(None, events.close)


def serve(
    config: ServerConfig,
    *,
    announce: Callable[[str], None] = lambda line: print(line, flush=True),  # noqa: T201 - the ready line
    stop_on_stdin_eof: bool = False,
) -> None:
    """Runs the server until SIGTERM or SIGINT (or stdin EOF when asked); everything
    accepted is committed before returning. Meanwhile aiohttp's loggers redact tokens."""
    with redacting_aiohttp_logs([config.admin_token]):
        asyncio.run(_serve_async(config, announce=announce, stop_on_stdin_eof=stop_on_stdin_eof))
