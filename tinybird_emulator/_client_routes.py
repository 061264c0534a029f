"""Routes the Tinybird CLI and SDKs call beside ``/v0/events``, with the service's shapes.

- ``GET /v0/workspace``, ``GET /v1/workspace``: the one workspace of this server.
- ``POST /v1/datasources/NAME/append`` (the CLI's ``datasource append --events``): the
  rows are queued like an Events API request to an existing data source, and the
  answer names an import job; ``GET /v0/jobs/ID`` reports it (``waiting``, ``done``
  with its ``blocks[].process_return[]`` counts, or ``error``), ``GET /v0/jobs`` lists
  them. Jobs live in memory (the last 1,000): a restarted server forgets them.
- ``GET /tokens``, ``GET /v1/user/workspaces``, ``POST /v1/workspaces``: what
  ``tb --local`` asks Tinybird Local for. This server has one workspace: every
  workspace name a client creates is another name of it, with the admin token.
  ``/tokens`` hands out the admin token without a token, as Tinybird Local does, so
  it answers only clients on a loopback address.

Rate limits and fault rules apply to ``/v0/events`` only.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import ipaddress
import threading
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from tinybird_emulator._storage import WriteJob, WriteResult, datasource_id

if TYPE_CHECKING:
    from tinybird_emulator._app import EventsApp

__all__ = ["ClientRoutes"]

_MAX_JOBS = 1000
_WORKSPACE_NAME = "tinybird_local"


def _json(obj: Any, *, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _workspace_id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "tinybird-local-workspace:" + name))


class _Jobs:
    """Import jobs of ``/v1/datasources/NAME/append``, newest last, updated from the writer thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def add(self, name: str, received_bytes: int, invalid_lines: int) -> dict[str, Any]:
        job_id = str(uuid.uuid4())
        now = _now()
        job = {
            "id": job_id,
            "job_id": job_id,
            "kind": "import",
            "status": "waiting",
            "created_at": now,
            "updated_at": now,
            "datasource": {"id": datasource_id(name), "name": name},
            "import_id": job_id,
            "mode": "append",
            "format": "ndjson",
            "statistics": {"bytes": received_bytes, "row_count": 0},
            "quarantine_rows": 0,
            "invalid_lines": invalid_lines,
            "blocks": [],
        }
        with self._lock:
            self._jobs[job_id] = job
            while len(self._jobs) > _MAX_JOBS:
                self._jobs.popitem(last=False)
            return dict(job)

    def finish(self, job_id: str, outcome: WriteResult | BaseException, started: float, finished: float) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return
            job["updated_at"] = _now()
            if isinstance(outcome, BaseException):
                job["status"] = "error"
                job["error"] = f"the write failed: {outcome}"
                return
            job["status"] = "done"
            job["statistics"]["row_count"] = outcome.successful_rows
            job["quarantine_rows"] = outcome.quarantined_rows
            job["blocks"] = [
                {
                    "block_id": job_id,
                    "processing_time": finished - started,
                    "process_return": [
                        {
                            "lines": outcome.successful_rows,
                            "quarantine": outcome.quarantined_rows,
                            "bytes": job["statistics"]["bytes"],
                            "invalid_lines": job["invalid_lines"],
                            "empty_lines": 0,
                        }
                    ],
                }
            ]

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else orjson.loads(orjson.dumps(job))

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {k: v for k, v in job.items() if k != "blocks"} for job in reversed(self._jobs.values())
            ]


def _is_loopback(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    if not peer:
        return False
    try:
        return ipaddress.ip_address(str(peer[0]).split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class ClientRoutes:
    """The handlers above, bound to one server's state."""

    def __init__(self, events: EventsApp) -> None:
        self._events = events
        self._jobs = _Jobs()
        self._workspace_names: list[str] = [_WORKSPACE_NAME]
        self._organization_id = _workspace_id("organization")

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/v0/workspace", self.workspace)
        app.router.add_get("/v1/workspace", self.workspace)
        app.router.add_post("/v1/datasources/{name}/append", self.append)
        app.router.add_get("/v0/jobs", self.list_jobs)
        app.router.add_get("/v0/jobs/{job_id}", self.job)
        app.router.add_get("/v0/regions", self.regions)
        app.router.add_get("/tokens", self.local_tokens)
        app.router.add_get("/v0/user/workspaces", self.user_workspaces)
        app.router.add_get("/v0/user/workspaces/", self.user_workspaces)
        app.router.add_get("/v1/user/workspaces", self.user_workspaces)
        app.router.add_get("/v1/user/workspaces/", self.user_workspaces)
        app.router.add_post("/v1/workspaces", self.create_workspace)

    # -- workspace -----------------------------------------------------------

    def _workspace_json(self, name: str, *, with_token: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": _workspace_id(name), "name": name, "is_branch": False}
        if with_token:
            entry["token"] = self._events.config.admin_token
        return entry

    async def workspace(self, request: web.Request) -> web.StreamResponse:
        info = self._events.auth(request)
        if info is None:
            return _error(403, "invalid or missing token")
        body = self._workspace_json(_WORKSPACE_NAME, with_token=False)
        body["scope"] = "admin" if info.is_admin else "token"
        return _json(body)

    async def user_workspaces(self, request: web.Request) -> web.StreamResponse:
        info = self._events.auth(request)
        if info is None or not info.is_admin:
            return _error(403, "listing workspaces needs an ADMIN token")
        workspaces = [self._workspace_json(name, with_token=True) for name in self._workspace_names]
        return _json({"organization_id": self._organization_id, "workspaces": workspaces})

    async def create_workspace(self, request: web.Request) -> web.StreamResponse:
        info = self._events.auth(request)
        if info is None or not info.is_admin:
            return _error(403, "creating workspaces needs an ADMIN token")
        name = request.query.get("name", "")
        if not name or len(name) > 100:
            return _error(400, "missing or invalid 'name' parameter")
        if name not in self._workspace_names:
            self._workspace_names.append(name)
        return _json(self._workspace_json(name, with_token=False))

    async def regions(self, request: web.Request) -> web.StreamResponse:
        # The CLI asks the host it was given; the one region is that host.
        host = f"{request.scheme}://{request.host}"
        return _json({"regions": [{"name": "local", "provider": "local", "api_host": host, "host": host}]})

    async def local_tokens(self, request: web.Request) -> web.StreamResponse:
        if not _is_loopback(request):
            return _error(404, "Not Found")
        token = self._events.config.admin_token
        return _json({"user_token": token, "admin_token": token, "workspace_admin_token": token})

    # -- /v1/datasources/NAME/append and jobs ----------------------------------

    async def append(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        info = self._events.auth(request)
        if info is None:
            return _error(403, "invalid or missing token")
        if self._events.store.schema(name) is None:
            return _error(404, f"Data Source '{name}' not found")
        if not info.can_append(name):
            return _error(403, f"this token has no DATASOURCE:APPEND scope for '{name}'")
        fmt = request.query.get("format", "ndjson").lower()
        if fmt not in ("ndjson", "json"):
            return _error(400, f"unsupported format {fmt!r} here; use ndjson")
        decoded = await self._events.read_and_decode(request, name, fmt)
        if isinstance(decoded, web.StreamResponse):
            return decoded
        job = self._jobs.add(name, decoded.received_bytes, len(decoded.body.invalid))
        loop = asyncio.get_running_loop()
        started = loop.time()

        def finish(outcome: WriteResult | BaseException) -> None:  # on the writer thread, once committed
            self._jobs.finish(job["id"], outcome, started, loop.time())

        write = WriteJob(
            name=name,
            lines=decoded.body.lines,
            invalid=decoded.body.invalid,
            new_schema=None,
            cost_bytes=decoded.body.cost_bytes,
            done=finish,
        )
        config = self._events.config
        if not self._events.store.try_submit(write, max_jobs=config.queue_max_requests, max_bytes=config.queue_max_bytes):
            self._jobs.finish(job["id"], RuntimeError("the write queue is full"), started, loop.time())
            return _error(503, "the write queue is full; nothing was inserted, retry later")
        job_url = f"{request.scheme}://{request.host}/v0/jobs/{job['id']}"
        return _json({**job, "job_url": job_url})

    async def job(self, request: web.Request) -> web.StreamResponse:
        if self._events.auth(request) is None:
            return _error(403, "invalid or missing token")
        job = self._jobs.get(request.match_info["job_id"])
        if job is None:
            return _error(404, "Job not found")
        return _json(job)

    async def list_jobs(self, request: web.Request) -> web.StreamResponse:
        if self._events.auth(request) is None:
            return _error(403, "invalid or missing token")
        jobs = self._jobs.all()
        for key in ("status", "kind"):
            wanted = request.query.get(key)
            if wanted:
                jobs = [job for job in jobs if job.get(key) == wanted]
        return _json({"jobs": jobs})
