"""LocalServer: runs ``python -m tinybird_emulator serve`` as a subprocess and talks to it.

The server runs in its own process (its own GIL, killable with SIGKILL for
durability tests). The object waits for the ready line, knows the URL and the
admin token, and wraps the admin endpoints (faults, stats, SQL, tokens).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tinybird_emulator._config import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_QUEUE_MAX_BYTES,
    DEFAULT_QUEUE_MAX_REQUESTS,
    DEFAULT_RATE_LIMIT_RPS,
)
from tinybird_emulator._faults import FaultRule, parse_rules
from tinybird_emulator._tokens import ADMIN_TOKEN_ENV, generate_token

__all__ = ["LocalServer", "LocalServerError"]

_LOG = logging.getLogger(__name__)
_READY_PREFIX = "Tinybird local Events API listening on "
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)

FaultSpec = FaultRule | Mapping[str, Any]


class LocalServerError(RuntimeError):
    """The local server answered an admin call with an error, or did not start."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _rules_json(faults: Sequence[FaultSpec]) -> list[dict[str, Any]]:
    raw = [f.to_json() if isinstance(f, FaultRule) else dict(f) for f in faults]
    parse_rules(raw)  # ValueError now rather than a failed start
    return raw


class LocalServer:
    """A local Tinybird Events API server in a subprocess, on a loopback port.

    Args:
        data_dir: Folder for the database and tokens; a temporary folder (removed
            by :meth:`stop`) when None.
        token: Admin token; generated when None.
        port: TCP port; 0 picks a free one, kept across :meth:`restart`.
        rate_limit_rps: Requests per second per data source; None lifts the limit.
        rate_limit_bytes_per_sec: Bytes per second per data source; None: no limit.
        max_body_bytes: Largest body (wire and decoded).
        queue_max_bytes: Accepted-but-uncommitted bytes beyond which requests get 503; also the
            bytes of the bodies being received (see ``ServerConfig.queue_max_bytes``).
        queue_max_requests: Accepted-but-uncommitted requests beyond which requests get 503.
        faults: Fault rules active from the start (dicts or FaultRule).
        synchronous: SQLite ``PRAGMA synchronous``: FULL (default) or NORMAL.
        startup_timeout_secs: How long to wait for the ready line.
        request_timeout_secs: Timeout of the admin calls made by this object.
        extra_args: More ``serve`` arguments, passed as they are.
    """

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike | None = None,
        token: str | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        rate_limit_rps: float | None = DEFAULT_RATE_LIMIT_RPS,
        rate_limit_bytes_per_sec: int | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        queue_max_bytes: int = DEFAULT_QUEUE_MAX_BYTES,
        queue_max_requests: int = DEFAULT_QUEUE_MAX_REQUESTS,
        faults: Sequence[FaultSpec] | None = None,
        synchronous: str = "FULL",
        startup_timeout_secs: float = 30.0,
        request_timeout_secs: float = 60.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port!r}")
        if rate_limit_rps is not None and not rate_limit_rps > 0:
            raise ValueError(f"rate_limit_rps must be > 0 or None, got {rate_limit_rps!r}")
        if rate_limit_bytes_per_sec is not None and not rate_limit_bytes_per_sec > 0:
            raise ValueError(f"rate_limit_bytes_per_sec must be > 0 or None, got {rate_limit_bytes_per_sec!r}")
        if not max_body_bytes > 0:
            raise ValueError(f"max_body_bytes must be > 0, got {max_body_bytes!r}")
        if not queue_max_bytes > 0 or not queue_max_requests > 0:
            raise ValueError("queue_max_bytes and queue_max_requests must be > 0")
        if not startup_timeout_secs > 0 or not request_timeout_secs > 0:
            raise ValueError("timeouts must be > 0")
        self._own_dir = data_dir is None
        self._data_dir: str | None = None if data_dir is None else os.fspath(data_dir)
        self._token = token or generate_token()
        self._host = host
        self._port = port
        self._args = [
            "--rate-limit-rps", "none" if rate_limit_rps is None else repr(float(rate_limit_rps)),
            "--rate-limit-bytes-per-sec", "none" if rate_limit_bytes_per_sec is None else str(int(rate_limit_bytes_per_sec)),
            "--max-body-bytes", str(int(max_body_bytes)),
            "--queue-max-bytes", str(int(queue_max_bytes)),
            "--queue-max-requests", str(int(queue_max_requests)),
            "--synchronous", synchronous,
            *extra_args,
        ]
        self._faults = _rules_json(faults or ())
        self._startup_timeout_secs = startup_timeout_secs
        self._request_timeout_secs = request_timeout_secs
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None
        self._log_fh: Any | None = None
        self._url: str | None = None

    # -- lifecycle -------------------------------------------------------------

    def __repr__(self) -> str:
        return f"LocalServer(url={self._url!r}, data_dir={self._data_dir!r}, running={self.running})"

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        if self._url is None:
            raise LocalServerError("the server has not been started")
        return self._url

    @property
    def token(self) -> str:
        """The admin token (every scope)."""
        return self._token

    @property
    def port(self) -> int:
        return self._port

    @property
    def data_dir(self) -> str:
        if self._data_dir is None:
            raise LocalServerError("the server has not been started")
        return self._data_dir

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def log_path(self) -> str:
        """The server's stderr (its log) is appended to this file in the data dir."""
        return os.path.join(self.data_dir, "emulator.log")

    def start(self) -> LocalServer:
        """Starts the subprocess and waits until it listens. Returns self."""
        if self.running:
            return self
        if self._data_dir is None:
            self._data_dir = tempfile.mkdtemp(prefix="tinybird-local-")
        os.makedirs(self._data_dir, exist_ok=True)
        cmd = [
            sys.executable, "-m", "tinybird_emulator", "serve",
            "--host", self._host, "--port", str(self._port),
            "--data-dir", self._data_dir,
            "--stop-on-stdin-eof",
            *self._args,
        ]
        if self._faults:
            faults_path = os.path.join(self._data_dir, "faults-at-start.json")
            with open(faults_path, "w", encoding="utf-8") as fh:
                json.dump(self._faults, fh)
            cmd += ["--faults", faults_path]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # In the environment rather than argv, which any local user can read with ps.
        env[ADMIN_TOKEN_ENV] = self._token
        self._log_fh = open(self.log_path, "ab")  # noqa: SIM115 - the server's stderr until it stops
        # The server stops when its stdin closes: when this process exits, even by SIGKILL.
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._log_fh, stdin=subprocess.PIPE, env=env
        )
        self._finalizer = weakref.finalize(self, _kill_orphan, self._proc)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(self._proc.stdout, lines), daemon=True).start()
        try:
            while True:
                try:
                    line = lines.get(timeout=self._startup_timeout_secs)
                except queue.Empty:
                    raise LocalServerError(
                        f"the server did not start within {self._startup_timeout_secs} s; see {self.log_path}"
                    ) from None
                if line is None:
                    raise LocalServerError(
                        f"the server exited with code {self._proc.wait()} before it was ready: {self._log_tail()}"
                    )
                if line.startswith(_READY_PREFIX):
                    self._url = line[len(_READY_PREFIX):].strip()
                    self._port = int(self._url.rsplit(":", 1)[1])
                    break
        except BaseException:
            self._terminate(kill=True)
            raise
        _LOG.info("local Events API server started at %s (pid %d)", self._url, self._proc.pid)
        return self

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 2000))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _terminate(self, *, kill: bool, timeout_secs: float = 30.0) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                if kill:
                    proc.kill()
                else:
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_secs)
                except subprocess.TimeoutExpired:
                    _LOG.warning("the server did not stop within %s s; killing it", timeout_secs)
                    proc.kill()
                    proc.wait()
            for stream in (proc.stdout, proc.stdin):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def stop(self) -> None:
        """Stops gracefully (everything accepted is committed); removes a temporary data dir."""
        self._terminate(kill=False)
        if self._own_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def kill(self) -> None:
        """SIGKILL, as a crash would; :meth:`restart` or :meth:`start` works afterwards."""
        self._terminate(kill=True)

    def restart(self) -> LocalServer:
        """Graceful stop, then start on the same port and data dir."""
        self._terminate(kill=False)
        return self.start()

    # -- admin calls -----------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple] | None = None,
        body: bytes | None = None,
        token: str | None = None,
    ) -> Any:
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(list(params))
        request = urllib.request.Request(url, data=body, method=method)
        request.add_header("Authorization", f"Bearer {token or self._token}")
        if body is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self._request_timeout_secs) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            payload = exc.read().decode("utf-8", "replace")
            try:
                message = json.loads(payload).get("error", payload)
            except (ValueError, AttributeError):
                message = payload
            raise LocalServerError(f"{method} {path} -> {exc.code}: {message}", status=exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise LocalServerError(f"{method} {path} failed: {exc}") from None

    def set_faults(self, rules: Sequence[FaultSpec]) -> list[dict[str, Any]]:
        """Replaces the active fault rules (their counters restart at zero)."""
        body = json.dumps(_rules_json(rules)).encode()
        return self._call("PUT", "/_emulator/faults", body=body)["rules"]

    def clear_faults(self) -> None:
        self._call("DELETE", "/_emulator/faults")

    def faults(self) -> dict[str, Any]:
        """Active rules and, per rule, how often it matched and fired."""
        return self._call("GET", "/_emulator/faults")

    def stats(self) -> dict[str, Any]:
        """Requests by status, rows stored and quarantined, fault firings, queue state."""
        return self._call("GET", "/_emulator/stats")

    def reset_stats(self) -> dict[str, Any]:
        """Restarts the request and row counters from zero (not the fault counters)."""
        return self._call("DELETE", "/_emulator/stats")

    def flush(self) -> None:
        """Returns once every request accepted so far (even with 202) is committed."""
        self._call("POST", "/_emulator/flush")

    def sql(self, sql: str, *, token: str | None = None) -> dict[str, Any]:
        """The whole /v0/sql answer: meta, data, rows, statistics."""
        return self._call("GET", "/v0/sql", params=[("q", sql)], token=token)

    def query(self, sql: str, *, token: str | None = None) -> list[dict[str, Any]]:
        """Runs a read-only SELECT; returns its rows as dicts."""
        return self.sql(sql, token=token)["data"]

    def datasources(self) -> dict[str, dict[str, Any]]:
        """``{name: {"rows": n, "quarantined": m, "columns": [{"name","type","jsonpath"}]}}``."""
        listing = self._call("GET", "/v0/datasources")["datasources"]
        return {
            d["name"]: {
                "rows": d["rows"],
                "quarantined": d["quarantined_rows"],
                "columns": [{k: c[k] for k in ("name", "type", "jsonpath")} for c in d["columns"]],
            }
            for d in listing
        }

    def quarantined_lines(self, datasource: str) -> list[dict[str, Any]]:
        """The quarantined rows of ``datasource`` in arrival order, each with the row
        as received (``c__raw``), which ``NAME_quarantine`` does not show: read from the
        data dir, read-only, for tests. Call :meth:`flush` first after a 202."""
        import sqlite3

        from tinybird_emulator._schema import QUARANTINE_TABLE_PREFIX, quote_ident
        from tinybird_emulator._storage import DB_FILE

        path = os.path.join(self.data_dir, DB_FILE)
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            cur = conn.execute(
                f"SELECT c__raw, c__error_column, c__error FROM {quote_ident(QUARANTINE_TABLE_PREFIX + datasource)} "
                "ORDER BY rowid"
            )
            return [
                {"c__raw": raw, "c__error_column": json.loads(columns), "c__error": json.loads(errors)}
                for raw, columns, errors in cur
            ]
        finally:
            conn.close()

    def create_token(self, name: str, *, scopes: Sequence[str]) -> str:
        """Creates a token with narrower scopes (e.g. ``DATASOURCE:APPEND:events``); returns it."""
        params = [("name", name)] + [("scope", s) for s in scopes]
        return self._call("POST", "/v0/tokens", params=params)["token"]


def _kill_orphan(proc: subprocess.Popen) -> None:
    """At interpreter exit (or garbage collection) of a LocalServer never stopped."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    try:
        for raw in iter(stream.readline, b""):
            lines.put(raw.decode("utf-8", "replace"))
    except (OSError, ValueError):
        pass
    lines.put(None)
