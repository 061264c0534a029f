"""Storage: one SQLite database in the data dir, one writer thread, one reader thread.

The writer thread owns the only write connection. It takes queued jobs in
groups, applies each inside a savepoint of one transaction, commits, and only
then reports the jobs done (which is when a ``wait=true`` request is answered
200). A job's rows go through one mechanism: the schema's SQL over their JSON
text, which checks each value in SQLite, stores the rows that fit and tells
which do not (their quarantine rows). One mechanism rather than two: a second,
faster path that bound parsed values (``_rows``) was removed after measuring
that neither the demo nor the test suite needed it (README, "The local Events
API server"). WAL mode; ``synchronous=FULL`` by default so that a
200 survives power loss, ``NORMAL`` survives a killed process. Queries from
/v0/sql run on a separate :class:`ReadOnlyDatabase` connection (also used by the
CLI without a server), guarded by ``mode=ro``, ``PRAGMA query_only`` and an
authorizer that allows reads only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from tinybird_emulator._body import json_array
from tinybird_emulator._config import DEFAULT_SQL_TIMEOUT_SECS
from tinybird_emulator._schema import QUARANTINE_SUFFIX, QUARANTINE_TABLE_PREFIX, Schema, quote_ident
from tinybird_emulator._sql import FORMATS, FormatError, QueryResult, column_types, render, split_format, split_limit

__all__ = [
    "DB_FILE",
    "DatasourceInfo",
    "QueryError",
    "ReadOnlyDatabase",
    "Store",
    "WriteJob",
    "WriteResult",
    "answer_sql",
    "answer_sql_formatted",
    "datasource_id",
]

_LOG = logging.getLogger(__name__)

DB_FILE = "events.sqlite3"
_CATALOG = "_emulator_datasources"
_MAX_GROUP_JOBS = 64
_MAX_GROUP_BYTES = 32_000_000
# Rows per multi-row INSERT of bound values: each statement is one call into SQLite
# (which runs without the GIL) instead of one per row, and is compiled once per
# data source and size.
_MAX_ROWS_PER_INSERT = 1024
_MAX_RESULT_ROWS = 1_000_000


@dataclasses.dataclass(frozen=True)
class WriteResult:
    successful_rows: int
    quarantined_rows: int
    import_id: str
    # The NDJSON text of the rows stored (see DatasourceInfo.bytes).
    bytes: int = 0


@dataclasses.dataclass
class WriteJob:
    """Rows for one data source, from one request.

    ``lines`` are the texts of the valid rows (validated JSON objects), converted
    and stored by the writer. ``done`` is called from the writer thread once the
    job is committed (with a WriteResult) or failed (with the exception).
    """

    name: str
    lines: list[str]
    invalid: list[tuple[str, str]]
    new_schema: Schema | None
    cost_bytes: int
    done: Callable[[WriteResult | BaseException], None] | None = None


class QueryError(Exception):
    """A /v0/sql query was refused (status 403) or failed (400); the message is safe to return."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


_STOP = object()


def _utc_now_text() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _utc_now_micro() -> str:
    """The service's timestamps of data sources: UTC, with microseconds."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _with_micro(stamp: str | None) -> str | None:
    # Data dirs written before updated_at existed hold whole seconds.
    return stamp + ".000000" if stamp is not None and len(stamp) == 19 else stamp


@dataclasses.dataclass(frozen=True)
class DatasourceInfo:
    """What the catalog knows of a data source beside its schema.

    ``bytes`` counts the NDJSON text of the rows stored (the local server's measure,
    not the compressed size a ClickHouse table would report).
    """

    rows: int = 0
    quarantined: int = 0
    bytes: int = 0
    created_at: str | None = None
    updated_at: str | None = None


def datasource_id(name: str) -> str:
    """A stable id in the service's ``t_<32 hex>`` form, derived from the name."""
    return "t_" + uuid.uuid5(uuid.NAMESPACE_URL, "tinybird-local:" + name).hex


def _datasource_json(name: str, schema: Schema, info: DatasourceInfo) -> dict[str, Any]:
    """One entry of ``GET /v0/datasources``: the service's fields that apply here, plus
    ``rows``, ``quarantined_rows`` and ``quarantine`` of the local server."""
    return {
        "id": datasource_id(name),
        "name": name,
        "type": "ndjson",
        "columns": [
            {
                "name": c.name,
                "type": c.type,
                "jsonpath": c.jsonpath,
                "nullable": c.nullable and not c.base.startswith("Array("),
                "normalized_name": c.name,
                "codec": None,
                "default_value": None,
            }
            for c in schema.columns
        ],
        "statistics": {"row_count": info.rows, "bytes": info.bytes},
        "rows": info.rows,
        "quarantined_rows": info.quarantined,
        "quarantine": schema.quarantine_name,
        "created_at": _with_micro(info.created_at),
        "updated_at": _with_micro(info.updated_at or info.created_at),
        "engine": {"engine": "MergeTree"},
        "description": "",
        "tags": {},
        "shared_with": [],
        "used_by": [],
        "version": 0,
    }


_CATALOG_COLUMNS = "name, columns, created_at, rows, quarantined_rows, bytes, updated_at"


def _migrate(conn: sqlite3.Connection) -> None:
    """Brings a data dir written by an earlier version up to date: the catalog gains
    ``bytes`` and ``updated_at``; a quarantine table becomes the server's own table
    behind a view with the documented columns."""
    have = {row[1] for row in conn.execute(f"PRAGMA table_info({_CATALOG})")}
    if "bytes" not in have:
        conn.execute(f"ALTER TABLE {_CATALOG} ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0")
    if "updated_at" not in have:
        conn.execute(f"ALTER TABLE {_CATALOG} ADD COLUMN updated_at TEXT")
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    for name, columns in conn.execute(f"SELECT name, columns FROM {_CATALOG}").fetchall():
        schema = Schema.from_json(name, orjson.loads(columns))
        if schema.quarantine_name in tables and schema.quarantine_table not in tables:
            conn.execute(
                f"ALTER TABLE {quote_ident(schema.quarantine_name)} RENAME TO {quote_ident(schema.quarantine_table)}"
            )
            conn.execute(schema.quarantine_view_statement())


class Store:
    """The database of one data dir: catalog, writer thread, read-only queries."""

    def __init__(
        self, data_dir: str, *, synchronous: str = "FULL", sql_timeout_secs: float = DEFAULT_SQL_TIMEOUT_SECS
    ) -> None:
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, DB_FILE)
        self._synchronous = synchronous.upper()
        self._lock = threading.Lock()
        self._catalog: dict[str, Schema] = {}
        self._info: dict[str, DatasourceInfo] = {}
        self._queue: queue.Queue[Any] = queue.Queue()
        self._queued_bytes = 0
        self._queued_jobs = 0
        self.rows_stored = 0
        self.rows_quarantined = 0
        self.commits = 0
        self._writer: threading.Thread | None = None
        # The read-only connection is used from this one thread only.
        self._reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="emulator-sql")
        self._init_db()
        self._db = ReadOnlyDatabase(self.path, sql_timeout_secs=sql_timeout_secs)

    # -- setup -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        return conn

    def _init_db(self) -> None:
        conn = self._connect()
        try:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {_CATALOG} (name TEXT PRIMARY KEY, columns TEXT NOT NULL, "
                "created_at TEXT NOT NULL, rows INTEGER NOT NULL DEFAULT 0, "
                "quarantined_rows INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0, updated_at TEXT)"
            )
            conn.execute("BEGIN IMMEDIATE")
            _migrate(conn)
            conn.execute("COMMIT")
            for name, columns, created, rows, quarantined, nbytes, updated in conn.execute(
                f"SELECT {_CATALOG_COLUMNS} FROM {_CATALOG}"
            ):
                self._catalog[name] = Schema.from_json(name, orjson.loads(columns))
                self._info[name] = DatasourceInfo(rows, quarantined, nbytes, created, updated)
        finally:
            conn.close()

    def start(self) -> None:
        self._writer = threading.Thread(target=self._run_writer, name="emulator-writer", daemon=True)
        self._writer.start()

    def close(self) -> None:
        """Commits everything queued, then stops the threads."""
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        self._reader.submit(self._db.close).result()
        self._reader.shutdown(wait=True)

    # -- catalog -----------------------------------------------------------

    def schema(self, name: str) -> Schema | None:
        return self._catalog.get(name)

    def same_but_case(self, name: str, *, also: Iterable[str] = ()) -> str | None:
        """The data source (or name of ``also``) that is ``name`` but for case, if any (and
        not ``name`` itself).

        SQLite table names ignore case, so this server cannot hold both: the
        second would write into the first's table, and the catalog of both would
        break every ``/v0/sql`` query.
        """
        with self._lock:
            return _case_twin(name, (*self._catalog, *also))

    def datasources(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                _datasource_json(name, schema, self._info.get(name, DatasourceInfo()))
                for name, schema in sorted(self._catalog.items())
            ]

    # -- queue ---------------------------------------------------------------

    def queued(self) -> tuple[int, int]:
        """(jobs, bytes) accepted but not yet committed."""
        with self._lock:
            return self._queued_jobs, self._queued_bytes

    def try_submit(self, job: WriteJob, *, max_jobs: int, max_bytes: int) -> bool:
        """Queues the job unless the queue is full; False means nothing was queued."""
        with self._lock:
            if self._queued_jobs + 1 > max_jobs or (
                self._queued_jobs > 0 and self._queued_bytes + job.cost_bytes > max_bytes
            ):
                return False
            self._queued_jobs += 1
            self._queued_bytes += job.cost_bytes
        self._queue.put(job)
        return True

    def submit_marker(self, job: WriteJob) -> None:
        """Queues a job without rows (name ``""``) that completes after everything before it."""
        with self._lock:
            self._queued_jobs += 1
        self._queue.put(job)

    # -- writer --------------------------------------------------------------

    def _run_writer(self) -> None:
        conn = self._connect()
        stopping = False
        try:
            while not stopping:
                first = self._queue.get()
                if first is _STOP:
                    break
                group = [first]
                size = first.cost_bytes
                while len(group) < _MAX_GROUP_JOBS and size < _MAX_GROUP_BYTES:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stopping = True
                        break
                    group.append(item)
                    size += item.cost_bytes
                try:
                    self._write_group(conn, group)
                except Exception:  # pragma: no cover - a bug; keep serving the queue
                    _LOG.exception("writer failed on a group of %d job(s)", len(group))
        finally:
            conn.close()

    def _write_group(self, conn: sqlite3.Connection, group: list[WriteJob]) -> None:
        outcomes: list[WriteResult | BaseException] = []
        new_schemas: dict[str, Schema] = {}
        started = time.perf_counter()
        applied = started
        # One timestamp for the catalog table and the in-memory catalog: both answer
        # GET /v0/datasources (the CLI reads the table), and must agree.
        now = _utc_now_micro()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in group:
                if not job.name:
                    outcomes.append(WriteResult(successful_rows=0, quarantined_rows=0, import_id=""))
                    continue
                creates = job.name not in self._catalog and job.name not in new_schemas
                conn.execute("SAVEPOINT job")
                try:
                    outcomes.append(self._apply(conn, job, new_schemas, now))
                    conn.execute("RELEASE job")
                except Exception as exc:  # this job fails alone; the others of the group commit
                    if isinstance(exc, sqlite3.Error):
                        _LOG.error("write to %s failed: %s", job.name, exc)
                    else:
                        _LOG.exception("write to %s failed", job.name)
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    if creates:
                        new_schemas.pop(job.name, None)
                    outcomes.append(exc)
            applied = time.perf_counter()
            conn.execute("COMMIT")
        except Exception as exc:  # the group fails (disk full, I/O error...); the writer goes on
            _LOG.error("commit of %d job(s) failed: %s", len(group), exc)
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error as rollback_exc:
                _LOG.error("rollback failed: %s", rollback_exc)
            outcomes = [exc for _ in group]
            new_schemas = {}
        if _LOG.isEnabledFor(logging.DEBUG):
            _LOG.debug(
                "group of %d job(s), %d row(s): apply %.1f ms, commit %.1f ms",
                len(group),
                sum(o.successful_rows + o.quarantined_rows for o in outcomes if isinstance(o, WriteResult)),
                (applied - started) * 1000,
                (time.perf_counter() - applied) * 1000,
            )
        self._account(group, outcomes, new_schemas, now)
        for job, outcome in zip(group, outcomes, strict=False):
            if job.done is not None:
                try:
                    job.done(outcome)
                except Exception:  # a callback bug must not stop the writer
                    _LOG.exception("write callback failed")

    def _account(
        self,
        group: list[WriteJob],
        outcomes: list[WriteResult | BaseException],
        new_schemas: dict[str, Schema],
        now: str,
    ) -> None:
        """The in-memory catalog and counters after a group's commit (or failure)."""
        with self._lock:
            for name, schema in new_schemas.items():
                self._catalog[name] = schema
                self._info[name] = DatasourceInfo(created_at=now, updated_at=now)
            for job, outcome in zip(group, outcomes, strict=True):
                self._queued_jobs -= 1
                self._queued_bytes -= job.cost_bytes
                if isinstance(outcome, WriteResult):
                    info = self._info.get(job.name, DatasourceInfo(created_at=now))
                    self._info[job.name] = dataclasses.replace(
                        info,
                        rows=info.rows + outcome.successful_rows,
                        quarantined=info.quarantined + outcome.quarantined_rows,
                        bytes=info.bytes + outcome.bytes,
                        updated_at=now,
                    )
                    self.rows_stored += outcome.successful_rows
                    self.rows_quarantined += outcome.quarantined_rows
            self.commits += 1

    def _apply(
        self, conn: sqlite3.Connection, job: WriteJob, new_schemas: dict[str, Schema], now: str
    ) -> WriteResult:
        schema = self._catalog.get(job.name) or new_schemas.get(job.name)
        if schema is None:
            if job.new_schema is None:
                raise sqlite3.OperationalError(f"data source {job.name} does not exist")
            # Two creations that differ only in case, in one group or racing the app's check.
            clash = _case_twin(job.name, (*self._catalog, *new_schemas))
            if clash is not None:
                raise ValueError(f"the data source '{clash}' exists: names that differ only in case are one "
                                 f"table here")
            schema = job.new_schema
            for stmt in schema.create_statements():
                conn.execute(stmt)
            conn.execute(
                f"INSERT INTO {_CATALOG} (name, columns, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (schema.name, orjson.dumps(schema.to_json()).decode(), now, now),
            )
            new_schemas[job.name] = schema
        import_id = uuid.uuid4().hex
        ok = 0
        quarantined: list[tuple[Any, ...]] = []
        if job.lines:
            ok, quarantined = self._insert_json(conn, schema, json_array(job.lines), len(job.lines), import_id)
        if job.invalid:
            # Not ``now``: that one (with microseconds) is the catalog's updated_at below.
            inserted = _utc_now_text()
            empty = (None,) * len(schema.columns)
            for raw, error in job.invalid:
                quarantined.append(("[]", orjson.dumps([error]).decode(), import_id, inserted, raw, *empty))
        if quarantined:
            conn.executemany(schema.quarantine_insert_statement(), quarantined)
        nbytes = 0
        if job.lines and ok:
            # Exact when every valid row fits (the usual case), else in proportion.
            nbytes = (sum(map(len, job.lines)) + len(job.lines)) * ok // len(job.lines)
        conn.execute(
            f"UPDATE {_CATALOG} SET rows = rows + ?, quarantined_rows = quarantined_rows + ?, bytes = bytes + ?, "
            "updated_at = ? WHERE name = ?",
            (ok, len(quarantined), nbytes, now, job.name),
        )
        return WriteResult(successful_rows=ok, quarantined_rows=len(quarantined), import_id=import_id, bytes=nbytes)

    def _insert_json(
        self, conn: sqlite3.Connection, schema: Schema, array_text: str, valid_rows: int, import_id: str
    ) -> tuple[int, list[tuple[Any, ...]]]:
        """Inserts the fitting rows of a JSON array with the schema's SQL; the others
        are returned as quarantine rows."""
        quarantined: list[tuple[Any, ...]] = []
        conn.execute("SAVEPOINT fast")
        try:
            ok = conn.execute(schema.insert_statement(), (array_text,)).rowcount
            if ok < valid_rows:
                quarantined.extend(self._misfits(conn, schema, array_text, import_id))
            conn.execute("RELEASE fast")
        except sqlite3.Error as exc:
            # SQLite refused the array as a whole (e.g. a value its JSON parser
            # rejects although orjson accepted it): retry row by row.
            _LOG.warning("bulk insert into %s failed (%s); inserting row by row", schema.name, exc)
            conn.execute("ROLLBACK TO fast")
            conn.execute("RELEASE fast")
            ok, quarantined = self._row_by_row(conn, schema, array_text, import_id)
        return ok, quarantined

    @staticmethod
    def _misfits(conn: sqlite3.Connection, schema: Schema, array_text: str, import_id: str) -> list[tuple[Any, ...]]:
        now = _utc_now_text()
        rows = []
        for row in conn.execute(schema.misfits_statement(), (array_text,)):
            error_columns: list[str] = []
            errors: list[str] = []
            raws: list[Any] = []
            for i, col in enumerate(schema.columns):
                fits, json_type, raw, holds_nul = row[2 + 4 * i : 6 + 4 * i]
                raws.append(raw)
                if fits:
                    continue
                error_columns.append(col.name)
                if holds_nul:
                    errors.append(
                        f"value of column '{col.name}' ({col.type}) holds \\u0000 (a NUL character), "
                        "which the local server cannot store"
                    )
                elif json_type is None:
                    errors.append(f"column '{col.name}' ({col.type}) is missing")
                elif json_type == "null":
                    errors.append(f"column '{col.name}' ({col.type}) cannot be null")
                else:
                    shown = raw if raw is None or len(str(raw)) <= 100 else str(raw)[:100] + "..."
                    errors.append(f"value {shown!r} ({json_type}) of column '{col.name}' is not a valid {col.type}")
            rows.append(
                (orjson.dumps(error_columns).decode(), orjson.dumps(errors).decode(), import_id, now, row[1], *tuple(raws))
            )
        return rows

    def _row_by_row(
        self, conn: sqlite3.Connection, schema: Schema, array_text: str, import_id: str
    ) -> tuple[int, list[tuple[Any, ...]]]:
        ok = 0
        quarantined: list[tuple[Any, ...]] = []
        empty = (None,) * len(schema.columns)
        insert = schema.insert_statement()
        for obj in orjson.loads(array_text):
            line = orjson.dumps(obj).decode()
            single = "[" + line + "]"
            conn.execute("SAVEPOINT row")
            try:
                inserted = conn.execute(insert, (single,)).rowcount
                if inserted:
                    ok += 1
                else:
                    quarantined.extend(self._misfits(conn, schema, single, import_id))
                conn.execute("RELEASE row")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK TO row")
                conn.execute("RELEASE row")
                quarantined.append(
                    ("[]", orjson.dumps([f"rejected by storage: {exc}"]).decode(), import_id, _utc_now_text(), line, *empty)
                )
        return ok, quarantined

    # -- reads ---------------------------------------------------------------

    def submit_sql(
        self, q: str | None, *, readable: frozenset[str] | None
    ) -> concurrent.futures.Future[tuple[int, str, bytes]]:
        """The /v0/sql answer to ``q`` (see :func:`answer_sql_formatted`), computed on the reader thread."""
        return self._reader.submit(answer_sql_formatted, self._db, q, readable=readable)


def answer_sql(
    db: ReadOnlyDatabase, q: str | None, *, readable: frozenset[str] | None
) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of ``/v0/sql?q=...`` in the JSON format: the CLI's answer with
    ``--data-dir`` (a FORMAT clause other than JSON is refused)."""
    status, _, body = answer_sql_formatted(db, q, readable=readable, only_json=True)
    return status, orjson.loads(body)


def answer_sql_formatted(
    db: ReadOnlyDatabase, q: str | None, *, readable: frozenset[str] | None, only_json: bool = False
) -> tuple[int, str, bytes]:
    """Status, Content-Type and body of ``/v0/sql?q=...``, in the statement's FORMAT.

    Args:
        db: Where to run the statement.
        q: The statement, with an optional trailing ``FORMAT name`` (JSON when absent).
        readable: Data sources the token may read (with their quarantine); ``None`` for all.
        only_json: Refuse formats other than JSON (400).
    """
    json_type = FORMATS["JSON"]
    if q is None or not q.strip():
        return 400, json_type, orjson.dumps({"error": "missing the 'q' parameter: a SELECT statement"})
    try:
        statement, fmt = split_format(q)
        if only_json and fmt != "JSON":
            raise FormatError(f"only FORMAT JSON is written here, not {fmt}")
    except FormatError as exc:
        return 400, json_type, orjson.dumps({"error": str(exc)})
    try:
        result = db.run(statement, readable=readable)
    except QueryError as exc:
        return exc.status, json_type, orjson.dumps({"error": f"query failed: {exc}"})
    return 200, FORMATS[fmt], render(result, fmt)


def _case_twin(name: str, names: Iterable[str]) -> str | None:
    """The one of ``names`` that is ``name`` but for case (SQLite's table names ignore it), if any."""
    folded = name.casefold()
    return next((other for other in names if other != name and other.casefold() == folded), None)


class _Shapes:
    """Empty tables declared with the Tinybird types of every data source and its
    quarantine, in memory: a statement made into a view there tells, through
    ``PRAGMA table_info``, the type of each result column read as it is (SQLite
    follows columns through subqueries, CTEs and aliases)."""

    def __init__(self) -> None:
        self._key: tuple[tuple[str, str], ...] | None = None
        # Made on first use, by the thread that reads (sqlite3 connections stay in their thread).
        self._conn: sqlite3.Connection | None = None

    def declared(self, catalog: list[dict[str, Any]], sql: str) -> list[str]:
        key = tuple((row["name"], row["columns"]) for row in catalog)
        if key != self._key or self._conn is None:
            self._conn = self._build(catalog)
            self._key = key
        try:
            self._conn.execute(f"CREATE VIEW _emulator_shape AS {sql}")
        except (sqlite3.Error, sqlite3.Warning):
            return []  # not a plain SELECT here: the values tell the types
        try:
            return [row[2] for row in self._conn.execute("PRAGMA table_info(_emulator_shape)")]
        except sqlite3.Error:
            return []
        finally:
            self._conn.execute("DROP VIEW IF EXISTS _emulator_shape")

    def _build(self, catalog: list[dict[str, Any]]) -> sqlite3.Connection:
        self.close()
        conn = sqlite3.connect(":memory:", isolation_level=None)
        for row in catalog:
            schema = Schema.from_json(row["name"], orjson.loads(row["columns"]))
            for table, columns in schema.types_by_table().items():
                body = ", ".join(f"{quote_ident(n)} {quote_ident(t)}" for n, t in columns) or '"_" TEXT'
                conn.execute(f"CREATE TABLE {quote_ident(table)} ({body})")
        return conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class ReadOnlyDatabase:
    """Read-only access to the database of a data dir: /v0/sql statements and the catalog.

    The connection is opened with ``mode=ro`` and ``PRAGMA query_only``, and every
    statement of :meth:`run` also passes an authorizer that allows reads only, of
    data sources and quarantine data sources (the server's own tables are read only
    through the quarantine views). Works beside a running server (WAL readers see
    every committed write) or alone. Not thread-safe: use it from one thread at a time.

    Args:
        path: The SQLite file (``DATA_DIR/events.sqlite3``); opened on first use.
        sql_timeout_secs: Longest statement before it is interrupted.
    """

    def __init__(self, path: str, *, sql_timeout_secs: float = DEFAULT_SQL_TIMEOUT_SECS) -> None:
        self.path = path
        self._sql_timeout_secs = sql_timeout_secs
        self._conn: sqlite3.Connection | None = None
        self._shapes = _Shapes()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None, timeout=30)
            conn.execute("PRAGMA query_only=ON")
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._shapes.close()

    def _catalog(self) -> list[dict[str, Any]]:
        # SELECT *: a data dir written by an earlier version lacks bytes and updated_at.
        cur = self._connection().execute(f"SELECT * FROM {_CATALOG} ORDER BY name")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=False)) for row in cur.fetchall()]

    def datasources(self) -> list[dict[str, Any]]:
        """Every data source, as ``GET /v0/datasources`` lists them. sqlite3.Error if unreadable."""
        return [
            _datasource_json(
                row["name"],
                Schema.from_json(row["name"], orjson.loads(row["columns"])),
                DatasourceInfo(
                    row["rows"], row["quarantined_rows"], row.get("bytes", 0), row["created_at"], row.get("updated_at")
                ),
            )
            for row in self._catalog()
        ]

    def query(self, sql: str, *, readable: frozenset[str] | None) -> dict[str, Any]:
        """The JSON answer to one read-only statement; QueryError (403 or 400) when it is refused or fails."""
        return orjson.loads(render(self.run(sql, readable=readable), "JSON"))

    def run(self, sql: str, *, readable: frozenset[str] | None) -> QueryResult:
        """Runs one read-only statement (no FORMAT clause); QueryError (403 or 400) when
        it is refused or fails."""
        conn = self._connection()
        catalog = self._catalog()
        tables_read: set[str] = set()
        started = time.perf_counter()
        names, rows = self._execute(conn, sql, readable, tables_read)
        elapsed = time.perf_counter() - started
        before_limit = None
        unlimited = split_limit(sql)
        if unlimited is not None:
            try:
                before_limit = self._execute(conn, f"SELECT count(*) FROM ({unlimited})", readable, set())[1][0][0]
            except QueryError:
                before_limit = None  # the LIMIT was not the statement's own (e.g. inside a string)
        by_name = {row["name"]: row for row in catalog}
        rows_read = bytes_read = 0
        for table in tables_read:
            if table in by_name:
                rows_read += by_name[table]["rows"]
                bytes_read += by_name[table].get("bytes", 0)
            elif table.startswith(QUARANTINE_TABLE_PREFIX) and table[len(QUARANTINE_TABLE_PREFIX) :] in by_name:
                rows_read += by_name[table[len(QUARANTINE_TABLE_PREFIX) :]]["quarantined_rows"]
        declared = self._shapes.declared(catalog, sql) if names else []
        return QueryResult(
            names=names,
            types=column_types(sql, names, rows, declared if len(declared) == len(names) else []),
            rows=rows,
            elapsed_secs=elapsed,
            rows_read=rows_read,
            bytes_read=bytes_read,
            rows_before_limit=before_limit,
        )

    def _execute(
        self, conn: sqlite3.Connection, sql: str, readable: frozenset[str] | None, tables_read: set[str]
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        denied: list[str] = []
        authorize = _authorizer(readable, tables_read, denied)
        deadline = time.monotonic() + self._sql_timeout_secs
        conn.set_authorizer(authorize)
        conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 100_000)
        try:
            cur = conn.execute(sql)
            names = [d[0] for d in cur.description or ()]
            rows = cur.fetchmany(_MAX_RESULT_ROWS + 1)
            if len(rows) > _MAX_RESULT_ROWS:
                raise QueryError(f"the result has more than {_MAX_RESULT_ROWS} rows; add a LIMIT")
        except (sqlite3.Error, sqlite3.Warning) as exc:
            if denied:
                raise QueryError(denied[0], status=403) from None
            raise QueryError(str(exc)) from None
        finally:
            conn.set_authorizer(None)
            conn.set_progress_handler(None, 0)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        return names, rows


def _authorizer(
    readable: frozenset[str] | None, tables_read: set[str], denied: list[str]
) -> Callable[[int, str | None, str | None, str | None, str | None], int]:
    """Allows reads only: of data sources the token may read, and of the server's
    quarantine tables only through their ``NAME_quarantine`` views."""

    def may_read(name: str) -> bool:
        owner = name[: -len(QUARANTINE_SUFFIX)] if name.endswith(QUARANTINE_SUFFIX) else name
        return readable is None or owner in readable

    def authorize(action: int, arg1: str | None, arg2: str | None, db: str | None, src: str | None) -> int:
        if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE):
            return sqlite3.SQLITE_OK
        if action != sqlite3.SQLITE_READ or arg1 is None:
            return sqlite3.SQLITE_DENY
        if arg1.startswith(QUARANTINE_TABLE_PREFIX):
            owner = arg1[len(QUARANTINE_TABLE_PREFIX) :]
            # Through its view; or no column at all (count(*) reads the table's size only).
            if (src == owner + QUARANTINE_SUFFIX or arg2 == "") and may_read(owner):
                tables_read.add(arg1)
                return sqlite3.SQLITE_OK
            denied.append(f"this token may not read {src or arg1}")
            return sqlite3.SQLITE_DENY
        if arg1.startswith("_emulator"):
            denied.append(f"{arg1} is internal to the local server")
            return sqlite3.SQLITE_DENY
        if may_read(arg1):
            tables_read.add(arg1)
            return sqlite3.SQLITE_OK
        denied.append(f"this token may not read {arg1}")
        return sqlite3.SQLITE_DENY

    return authorize
