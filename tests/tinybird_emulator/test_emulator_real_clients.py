"""Every client Tinybird documents, run for real against the local server, unchanged.

The Tinybird CLI 5.x (``tb``) and the Forward SDK (``tinybird-sdk``, which pins
``tinybird`` 4.x) run in their own virtual environments (``.venv-clients/``), the
TypeScript SDK (``@tinybirdco/sdk``) under Node from ``.clients/``: ``./dev test``
installs them once. Each runs as a subprocess with the loopback guard
(``loopback_guard/``): a name lookup or connection to anything but loopback is
refused before it is sent, and every attempt is logged; the last tests read
those logs. ``tb --local`` looks for Tinybird Local on port 7181 unless
``TB_LOCAL_PORT`` says otherwise (its own advice when the port differs): the
test points it at the server's free port, so it never meets a developer's
server on 7181; that 7181 is both programs' default is checked apart.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from emulator_testlib import ADMIN_TOKEN
from tb import api as tb_api

from tinybird_emulator import LocalServer
from tinybird_emulator._config import DEFAULT_PORT

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
GUARD_DIR = Path(__file__).resolve().parent / "loopback_guard"
TB = ROOT / ".venv-clients" / "tb-cli" / "bin" / "tb"
TB_CLI_PYTHON = ROOT / ".venv-clients" / "tb-cli" / "bin" / "python"
TB_SDK_PYTHON = ROOT / ".venv-clients" / "tb-sdk" / "bin" / "python"
TS_SDK = ROOT / ".clients" / "node_modules" / "@tinybirdco" / "sdk" / "dist" / "index.js"

ROWS = [
    {"id": 1, "city": "Chicago", "at": "2020-04-05 00:05:38", "tags": ["a", "b"], "ok": True},
    {"id": 2, "city": "Madrid", "at": "2020-04-05 00:07:22", "tags": [], "ok": False},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    missing = [str(p) for p in (TB, TB_SDK_PYTHON, TS_SDK) if not p.exists()]
    assert not missing, f"the clients are not installed ({missing}): run ./dev test, which installs them"
    with LocalServer(data_dir=tmp_path_factory.mktemp("clients"), token=ADMIN_TOKEN, rate_limit_rps=None) as srv:
        response = requests.post(
            f"{srv.url}/v0/events?name=cli_events&wait=true",
            data="".join(json.dumps(row) + "\n" for row in ROWS),
            headers={"Authorization": f"Bearer {srv.token}"},
            timeout=30,
        )
        assert response.json() == {"successful_rows": 2, "quarantined_rows": 0}
        yield srv


@pytest.fixture(scope="module")
def guard_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guard") / "attempts.jsonl"


def _env(home: Path, guard_log: Path, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PYTHONPATH": str(GUARD_DIR),
        "NODE_OPTIONS": f"--require {GUARD_DIR / 'guard.cjs'}",
        "LOOPBACK_GUARD_LOG": str(guard_log),
        "TB_CLI_TELEMETRY_OPTOUT": "1",
        "TB_VERSION_WARNING": "0",
        "LANG": "C.UTF-8",
    }
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], *, stdin: str | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def _tb(server: LocalServer, tmp_path: Path, guard_log: Path, *args: str) -> str:
    cloud = ["--cloud", "--host", server.url, "--token", server.token]
    return _run([TB, *cloud, *args], tmp_path, _env(tmp_path, guard_log))


# -- the Tinybird CLI (tb, PyPI tinybird 5.x) -------------------------------------


def test_cli_datasource_append_events(server, tmp_path, guard_log):
    events = '{"id": 3, "city": "Tokyo", "at": "2020-04-05 00:09:00", "tags": ["c"], "ok": true}'
    out = _tb(server, tmp_path, guard_log, "datasource", "append", "cli_events", "--events", events)
    assert "1 row appended" in out, out
    assert server.query("SELECT city FROM cli_events WHERE id = 3") == [{"city": "Tokyo"}]


def test_cli_datasource_append_counts_quarantined_rows(server, tmp_path, guard_log):
    events = '{"id": 4, "city": "Lima", "at": "not a date", "tags": [], "ok": true}'
    out = _tb(server, tmp_path, guard_log, "datasource", "append", "cli_events", "--events", events)
    assert "1 row went to quarantine" in out, out
    rows = server.query("SELECT c__error_column, city FROM cli_events_quarantine WHERE city = 'Lima'")
    assert rows == [{"c__error_column": ["at"], "city": "Lima"}]


def test_cli_sql_with_stats(server, tmp_path, guard_log):
    out = _tb(server, tmp_path, guard_log, "sql", "SELECT city FROM cli_events WHERE id <= 2 ORDER BY id", "--stats")
    assert "** Query took" in out and "** Rows read:" in out and "** Bytes read:" in out, out
    assert "Chicago" in out and "Madrid" in out


def test_cli_sql_output_json(server, tmp_path, guard_log):
    out = _tb(
        server, tmp_path, guard_log, "--output", "json", "sql",
        "SELECT id, at, tags, ok, count() AS n FROM cli_events WHERE id = 1 GROUP BY id",
    )
    answer = json.loads(out)
    assert answer["meta"] == [
        {"name": "id", "type": "Int64"},
        {"name": "at", "type": "DateTime"},
        {"name": "tags", "type": "Array(String)"},
        {"name": "ok", "type": "Bool"},
        {"name": "n", "type": "UInt64"},
    ]
    assert answer["data"] == [{"id": 1, "at": "2020-04-05 00:05:38", "tags": ["a", "b"], "ok": True, "n": 1}]
    assert answer["rows"] == 1 and answer["rows_before_limit_at_least"] == 1
    assert set(answer["statistics"]) == {"elapsed", "rows_read", "bytes_read"}
    assert answer["statistics"]["rows_read"] >= 2 and answer["statistics"]["bytes_read"] > 0


def test_cli_sql_output_csv(server, tmp_path, guard_log):
    out = _tb(server, tmp_path, guard_log, "--output", "csv", "sql", "SELECT id, city, tags, ok FROM cli_events WHERE id <= 2 ORDER BY id")
    assert out.rstrip("\n").splitlines() == ['"id","city","tags","ok"', "1,\"Chicago\",\"['a','b']\",true", '2,"Madrid","[]",false']
    assert list(csv.reader(io.StringIO(out)))[1] == ["1", "Chicago", "['a','b']", "true"]


def test_cli_datasource_ls(server, tmp_path, guard_log):
    out = _tb(server, tmp_path, guard_log, "datasource", "ls")
    assert "name: cli_events" in out, out
    stored = server.query("SELECT count() AS n FROM cli_events")[0]["n"]
    assert f"row_count: {stored}" in out


def test_cli_local_finds_the_server_through_tb_local_port(server, tmp_path, guard_log):
    env = _env(tmp_path, guard_log, TB_LOCAL_PORT=str(server.port), TB_LOCAL_HOST="127.0.0.1")
    out = _run([TB, "--local", "--output", "json", "sql", "SELECT count() AS n FROM cli_events WHERE id <= 2"], tmp_path, env)
    assert json.loads(out)["data"] == [{"n": 2}]
    out = _run([TB, "--local", "datasource", "ls"], tmp_path, env)
    assert "name: cli_events" in out, out


def test_cli_and_server_default_to_port_7181(tmp_path, guard_log):
    env = _env(tmp_path, guard_log)
    code = "from tinybird.tb.modules.local_common import TB_LOCAL_PORT; print(TB_LOCAL_PORT)"
    assert _run([TB_CLI_PYTHON, "-c", code], tmp_path, env).strip() == str(DEFAULT_PORT) == "7181"


# -- the Python SDKs ----------------------------------------------------------------

_FORWARD_SDK_SCRIPT = """
import json, sys
from tinybird_sdk import TinybirdApi
api = TinybirdApi({"base_url": sys.argv[1], "token": sys.argv[2]})
ingested = api.ingest_batch("sdk_forward", [{"id": 1, "v": 1.5}, {"id": 2, "v": 2.5}])
answer = api.sql("SELECT count() AS n, sum(v) AS s FROM sdk_forward")
print(json.dumps({"ingested": ingested, "answer": answer}))
"""


def test_forward_python_sdk_ingest_batch_and_sql(server, tmp_path, guard_log):
    out = _run([TB_SDK_PYTHON, "-c", _FORWARD_SDK_SCRIPT, server.url, server.token], tmp_path, _env(tmp_path, guard_log))
    result = json.loads(out)
    assert result["ingested"] == {"successful_rows": 2, "quarantined_rows": 0}
    assert result["answer"]["data"] == [{"n": 2, "s": 4.0}]
    assert result["answer"]["meta"] == [{"name": "n", "type": "UInt64"}, {"name": "s", "type": "Float64"}]


def test_tinybird_python_sdk_sql(server):
    api = tb_api.API(server.token, server.url)
    response = api.get("/sql", params={"q": "SELECT id, city FROM cli_events WHERE id = 2 FORMAT JSON"})
    assert response.status_code == 200
    assert response.json()["data"] == [{"id": 2, "city": "Madrid"}]


# -- the TypeScript SDK (@tinybirdco/sdk) ------------------------------------------

_TS_SDK_SCRIPT = """
import { TinybirdApi } from "%s";
const api = new TinybirdApi({ baseUrl: process.argv[2], token: process.argv[3] });
const ingested = await api.ingestBatch("sdk_ts", [{ id: 1, name: "a" }, { id: 2, name: "b" }]);
const answer = await api.sql("SELECT count() AS n, max(name) AS last FROM sdk_ts");
console.log(JSON.stringify({ ingested, answer }));
"""


def test_typescript_sdk_ingest_batch_and_sql(server, tmp_path, guard_log):
    script = tmp_path / "ingest.mjs"
    script.write_text(_TS_SDK_SCRIPT % TS_SDK.as_uri())
    out = _run(["node", script, server.url, server.token], tmp_path, _env(tmp_path, guard_log))
    result = json.loads(out)
    assert result["ingested"] == {"successful_rows": 2, "quarantined_rows": 0}
    assert result["answer"]["data"] == [{"n": 2, "last": "b"}]


# -- nothing left loopback -------------------------------------------------------------


def _attempts(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize(
    ("runtime", "command"),
    [
        ("python", [sys.executable, "-c", "import socket; socket.create_connection(('api.tinybird.co', 443), timeout=5)"]),
        ("python", [sys.executable, "-c", "import socket; socket.create_connection(('192.0.2.1', 443), timeout=5)"]),
        ("node", ["node", "-e", "await fetch('https://api.tinybird.co/v0/regions')", "--input-type=module"]),
        ("node", ["node", "-e", "require('net').connect(443, '192.0.2.1')"]),
    ],
)
def test_the_guard_refuses_other_hosts_before_sending(tmp_path, runtime, command):
    log = tmp_path / "attempts.jsonl"
    done = subprocess.run(command, cwd=tmp_path, env=_env(tmp_path, log), capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "loopback guard" in done.stderr
    attempts = _attempts(log)
    assert attempts and all(not a["allowed"] and a["runtime"] == runtime for a in attempts), attempts


def test_no_client_traffic_left_loopback(server, guard_log):
    """Runs last in this module: every attempt the clients made above went to the server."""
    attempts = _attempts(guard_log)
    runtimes = {a["runtime"] for a in attempts}
    assert runtimes == {"python", "node"}, runtimes
    refused = [a for a in attempts if not a["allowed"]]
    assert refused == [], refused
    connected = {a["target"] for a in attempts if a["kind"] == "connect"}
    assert connected == {f"127.0.0.1:{server.port}"}, connected
