"""Server configuration: one frozen, validated record built by the CLI or LocalServer.

Limits default to the stricter, newer Tinybird documentation: 100 requests/s per
data source and 10 MB per request; the byte rate is unlimited unless configured.
"""

from __future__ import annotations

import dataclasses

from tinybird_emulator._faults import FaultRule

__all__ = [
    "DEFAULT_BODY_READ_TIMEOUT_SECS",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_PORT",
    "DEFAULT_QUEUE_MAX_BYTES",
    "DEFAULT_QUEUE_MAX_REQUESTS",
    "DEFAULT_RATE_LIMIT_RPS",
    "DEFAULT_SQL_TIMEOUT_SECS",
    "ServerConfig",
]

DEFAULT_PORT = 7181
DEFAULT_RATE_LIMIT_RPS = 100.0
DEFAULT_MAX_BODY_BYTES = 10_000_000
# Decoded bytes waiting for the writer thread; hitting this is what answers 503.
DEFAULT_QUEUE_MAX_BYTES = 128_000_000
DEFAULT_QUEUE_MAX_REQUESTS = 1_000
DEFAULT_SQL_TIMEOUT_SECS = 30.0
# Room for 10 MB over a slow link; a client stalled mid-body is answered 408 after it.
DEFAULT_BODY_READ_TIMEOUT_SECS = 60.0
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything `python -m tinybird_emulator serve` needs.

    Attributes:
        data_dir: Folder holding the SQLite database and the token file.
        admin_token: Token with every scope, valid for this run.
        host: Interface to listen on (loopback by default).
        port: TCP port; 0 picks a free one.
        rate_limit_rps: Requests per second per data source; ``None`` lifts it.
        rate_limit_bytes_per_sec: Wire bytes per second per data source; ``None`` lifts it.
        rate_limit_window_secs: Length of the fixed rate-limit window.
        max_body_bytes: Largest accepted body, checked on the wire size and on the
            decoded size.
        queue_max_bytes: Decoded bytes accepted but not yet committed; beyond it 503.
            Also the bound on the bytes of the bodies being received or waiting to
            be decoded (each counted at its ``Content-Length``, or ``max_body_bytes``
            without one): a body that would pass it is answered 503 (one body alone
            is always received).
        queue_max_requests: Requests accepted but not yet committed; beyond it 503.
        max_concurrent_decodes: Request bodies decoded at the same time; the others
            wait with their body read (each at most ``max_body_bytes``, all of them
            within ``queue_max_bytes``), so that a slow upload never holds a slot.
        body_read_timeout_secs: Longest time to receive a whole body (or to drain a
            refused one); past it the answer is 408 and the connection is closed.
        synchronous: SQLite ``PRAGMA synchronous`` (WAL mode). ``FULL`` makes a
            200 survive power loss; ``NORMAL`` survives a process kill only.
        faults: Fault rules active from the start.
        sql_timeout_secs: Longest /v0/sql query before it is interrupted.
    """

    data_dir: str
    admin_token: str = dataclasses.field(repr=False)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    rate_limit_rps: float | None = DEFAULT_RATE_LIMIT_RPS
    rate_limit_bytes_per_sec: int | None = None
    rate_limit_window_secs: float = 1.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    queue_max_bytes: int = DEFAULT_QUEUE_MAX_BYTES
    queue_max_requests: int = DEFAULT_QUEUE_MAX_REQUESTS
    max_concurrent_decodes: int = 4
    body_read_timeout_secs: float = DEFAULT_BODY_READ_TIMEOUT_SECS
    synchronous: str = "FULL"
    faults: tuple[FaultRule, ...] = ()
    sql_timeout_secs: float = DEFAULT_SQL_TIMEOUT_SECS

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise ValueError("data_dir must not be empty")
        if not self.admin_token:
            raise ValueError("admin_token must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port!r}")
        if self.rate_limit_rps is not None and not self.rate_limit_rps > 0:
            raise ValueError(f"rate_limit_rps must be > 0 or None, got {self.rate_limit_rps!r}")
        if self.rate_limit_bytes_per_sec is not None and not self.rate_limit_bytes_per_sec > 0:
            raise ValueError(
                f"rate_limit_bytes_per_sec must be > 0 or None, got {self.rate_limit_bytes_per_sec!r}"
            )
        if not self.rate_limit_window_secs > 0:
            raise ValueError(
                f"rate_limit_window_secs must be > 0, got {self.rate_limit_window_secs!r}"
            )
        if not self.max_body_bytes > 0:
            raise ValueError(f"max_body_bytes must be > 0, got {self.max_body_bytes!r}")
        if not self.queue_max_bytes > 0:
            raise ValueError(f"queue_max_bytes must be > 0, got {self.queue_max_bytes!r}")
        if not self.queue_max_requests > 0:
            raise ValueError(f"queue_max_requests must be > 0, got {self.queue_max_requests!r}")
        if not self.max_concurrent_decodes > 0:
            raise ValueError(
                f"max_concurrent_decodes must be > 0, got {self.max_concurrent_decodes!r}"
            )
        if not self.body_read_timeout_secs > 0:
            raise ValueError(f"body_read_timeout_secs must be > 0, got {self.body_read_timeout_secs!r}")
        if self.synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(
                f"synchronous must be one of {SYNCHRONOUS_MODES}, got {self.synchronous!r}"
            )
        if not self.sql_timeout_secs > 0:
            raise ValueError(f"sql_timeout_secs must be > 0, got {self.sql_timeout_secs!r}")
        object.__setattr__(self, "faults", tuple(self.faults))
