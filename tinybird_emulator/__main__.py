"""Command line of the local Tinybird Events API server.

Usage::

    python -m tinybird_emulator serve --port 7181 --data-dir DIR [--token TOKEN] [--faults FILE.json]
        [--rate-limit-rps 100|none] [--rate-limit-bytes-per-sec N|none]
        [--max-body-bytes 10000000] [--body-read-timeout-secs 60] [--queue-max-bytes N] [--queue-max-requests N]
        [--synchronous FULL|NORMAL] [--host 127.0.0.1] [--log-level INFO]
    python -m tinybird_emulator token create --data-dir DIR --name NAME --scope DATASOURCE:APPEND:events [--scope ...]
    python -m tinybird_emulator sql (--url URL --token TOKEN | --data-dir DIR) "SELECT count(*) FROM events"
    python -m tinybird_emulator datasources (--url URL --token TOKEN | --data-dir DIR)

``serve`` prints ``Tinybird local Events API listening on http://127.0.0.1:PORT``
once it accepts requests (``--port 0`` picks a free port). The admin token comes
from ``--token``, else ``$TB_LOCAL_ADMIN_TOKEN`` (not visible in ``ps``), else it
is generated and printed. SIGTERM or Ctrl-C stops it after
committing everything it accepted.

``token create`` writes to the data dir directly (the running server sees the
new token at once). ``sql`` and ``datasources`` ask a running server over HTTP
(``GET /v0/sql``, ``GET /v0/datasources``) and print its JSON answer; with
``--data-dir`` they read the database themselves, read-only, whether a server
runs on it or not, and print the same answer (statements are checked by the
same code as ``/v0/sql``: anything but a read is refused). An error answer goes
to stderr with exit code 1.

Fault rules (``--faults FILE.json`` and ``PUT /_emulator/faults``) are a JSON
list of objects with the keys: status (400-599) or reset (true), when
("before"|"after"), latency_secs, datasource, probability, seed, sequence
(1-based ordinals of matching requests), times, retry_after_secs, message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tinybird_emulator._config import ServerConfig
    from tinybird_emulator._storage import ReadOnlyDatabase

__all__ = ["main"]


def _optional_number(kind: type):
    def parse(text: str):
        if text.strip().lower() in ("none", "off", "unlimited", ""):
            return None
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0 or 'none', got {text!r}")
        return value

    return parse


def _build_parser() -> argparse.ArgumentParser:
    from tinybird_emulator._config import (
        DEFAULT_BODY_READ_TIMEOUT_SECS,
        DEFAULT_MAX_BODY_BYTES,
        DEFAULT_PORT,
        DEFAULT_QUEUE_MAX_BYTES,
        DEFAULT_QUEUE_MAX_REQUESTS,
        DEFAULT_RATE_LIMIT_RPS,
    )

    parser = argparse.ArgumentParser(
        prog="python -m tinybird_emulator",
        description="A local, durable, fault-injecting imitation of Tinybird's Events API.",
        epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port, 0 for a free one (default {DEFAULT_PORT})")
    serve.add_argument("--data-dir", required=True, help="folder for the SQLite database and tokens")
    serve.add_argument("--token", default=None,
                       help="admin token; else $TB_LOCAL_ADMIN_TOKEN; else generated and printed")
    serve.add_argument(
        "--rate-limit-rps", type=_optional_number(float), default=DEFAULT_RATE_LIMIT_RPS,
        help=f"requests/s per data source, or 'none' (default {DEFAULT_RATE_LIMIT_RPS:g})",
    )
    serve.add_argument(
        "--rate-limit-bytes-per-sec", type=_optional_number(int), default=None,
        help="wire bytes/s per data source, or 'none' (default none)",
    )
    serve.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                       help=f"largest body, wire and decoded (default {DEFAULT_MAX_BODY_BYTES})")
    serve.add_argument("--body-read-timeout-secs", type=float, default=DEFAULT_BODY_READ_TIMEOUT_SECS,
                       help="longest time to receive a body; then 408 and the connection is closed "
                       f"(default {DEFAULT_BODY_READ_TIMEOUT_SECS:g})")
    serve.add_argument("--queue-max-bytes", type=int, default=DEFAULT_QUEUE_MAX_BYTES,
                       help=f"uncommitted bytes, and bytes of bodies being received, before 503 (default {DEFAULT_QUEUE_MAX_BYTES})")
    serve.add_argument("--queue-max-requests", type=int, default=DEFAULT_QUEUE_MAX_REQUESTS,
                       help=f"uncommitted requests before 503 (default {DEFAULT_QUEUE_MAX_REQUESTS})")
    serve.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL", "EXTRA", "OFF"],
                       type=str.upper, help="SQLite synchronous mode (default FULL: a 200 survives power loss)")
    serve.add_argument("--faults", default=None, help="JSON file with fault rules active from the start")
    serve.add_argument("--log-level", default="INFO", help="logging level on stderr (default INFO)")
    serve.add_argument("--stop-on-stdin-eof", action="store_true",
                       help="stop when stdin closes (used by LocalServer so that no server outlives its parent)")

    token = sub.add_parser("token", help="manage tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="create a token with narrower scopes; prints it")
    create.add_argument("--data-dir", required=True)
    create.add_argument("--name", required=True)
    create.add_argument("--scope", action="append", required=True,
                        help="ADMIN, DATASOURCE:APPEND[:name], DATASOURCE:CREATE, DATASOURCE:READ[:name]; repeatable")

    sql = sub.add_parser("sql", help="run a read-only query, on a running server or on a data dir")
    _add_source_arguments(sql)
    sql.add_argument("query")

    ds = sub.add_parser("datasources", help="list the data sources, of a running server or of a data dir")
    _add_source_arguments(ds)
    return parser


def _add_source_arguments(command: argparse.ArgumentParser) -> None:
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="a running server (with --token)")
    source.add_argument("--data-dir", help="read this data dir's database directly, read-only; no token needed")
    command.add_argument("--token", help="a token of the --url server")


def _serve(args: argparse.Namespace) -> int:
    from tinybird_emulator._app import DataDirInUse, serve
    from tinybird_emulator._faults import parse_rules
    from tinybird_emulator._redact import RedactingFilter
    from tinybird_emulator._tokens import ADMIN_TOKEN_ENV, generate_token

    faults = ()
    if args.faults:
        try:
            with open(args.faults, encoding="utf-8") as fh:
                faults = parse_rules(json.load(fh))
        except (OSError, ValueError) as exc:
            print(f"error: cannot use the faults file {args.faults}: {exc}", file=sys.stderr)
            return 2
    token = args.token or os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        token = generate_token()
        print(f"Admin token: {token}", flush=True)
    # stderr is the server's log (LocalServer appends it to DATA_DIR/emulator.log):
    # every record written there is redacted, whichever logger it comes from.
    stderr = logging.StreamHandler(sys.stderr)
    stderr.addFilter(RedactingFilter([token]))
    logging.basicConfig(
        level=args.log_level.upper(), handlers=[stderr], format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = _config(args, token, faults)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        serve(config, stop_on_stdin_eof=args.stop_on_stdin_eof)
    except DataDirInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:  # e.g. the port is taken
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


def _config(args: argparse.Namespace, token: str, faults: tuple) -> ServerConfig:
    from tinybird_emulator._config import ServerConfig

    return ServerConfig(
        data_dir=os.path.abspath(args.data_dir),
        admin_token=token,
        host=args.host,
        port=args.port,
        rate_limit_rps=args.rate_limit_rps,
        rate_limit_bytes_per_sec=args.rate_limit_bytes_per_sec,
        max_body_bytes=args.max_body_bytes,
        body_read_timeout_secs=args.body_read_timeout_secs,
        queue_max_bytes=args.queue_max_bytes,
        queue_max_requests=args.queue_max_requests,
        synchronous=args.synchronous,
        faults=faults,
    )


def _print_answer(body: Any) -> int:
    print(json.dumps(body, indent=2, ensure_ascii=False))
    return 0


def _http_get(url: str, token: str, path: str, params: Sequence[tuple] = ()) -> int:
    full = url.rstrip("/") + path + ("?" + urllib.parse.urlencode(list(params)) if params else "")
    request = urllib.request.Request(full, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(exc.read().decode("utf-8", "replace"), file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: cannot reach {url}: {exc}", file=sys.stderr)
        return 2
    return _print_answer(body)


def _read_data_dir(data_dir: str, read: Callable[[ReadOnlyDatabase], tuple[int, dict[str, Any]]]) -> int:
    """Runs ``read(db)`` on the data dir's database, opened read-only, and prints its
    (status, body) as ``_http_get`` prints the server's answer."""
    import orjson

    from tinybird_emulator._storage import DB_FILE, ReadOnlyDatabase

    path = os.path.join(data_dir, DB_FILE)
    if not os.path.isfile(path):
        print(f"error: no database in {data_dir} (expected {path})", file=sys.stderr)
        return 2
    db = ReadOnlyDatabase(path)
    try:
        status, body = read(db)
    except sqlite3.Error as exc:
        print(f"error: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    finally:
        db.close()
    # Through the server's encoder and back, so that values print as they do with --url.
    raw = orjson.dumps(body)
    if status != 200:
        print(raw.decode(), file=sys.stderr)
        return 1
    return _print_answer(json.loads(raw))


def _read(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``sql`` and ``datasources``, from a server (--url) or from a data dir."""
    if args.url is not None and not args.token:
        parser.error(f"{args.command}: --url needs --token")
    if args.data_dir is not None and args.token:
        parser.error(f"{args.command}: --token goes with --url; --data-dir reads every data source")
    if args.command == "sql":
        if args.url is not None:
            return _http_get(args.url, args.token, "/v0/sql", [("q", args.query)])
        from tinybird_emulator._storage import answer_sql

        return _read_data_dir(args.data_dir, lambda db: answer_sql(db, args.query, readable=None))
    if args.url is not None:
        return _http_get(args.url, args.token, "/v0/datasources")
    return _read_data_dir(args.data_dir, lambda db: (200, {"datasources": db.datasources()}))


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "token":
        from tinybird_emulator._tokens import TokenStore

        os.makedirs(args.data_dir, exist_ok=True)
        try:
            token, _ = TokenStore(args.data_dir).create(name=args.name, scopes=args.scope)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(token)
        return 0
    if args.command in ("sql", "datasources"):
        return _read(args, parser)
    return 2


if __name__ == "__main__":
    sys.exit(main())
