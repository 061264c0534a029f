"""Clients written by others work unchanged: the documented curl commands and tinybird-python-sdk.

curl is needed (it is on every machine of this project); the CLI and the other SDKs are in
test_emulator_real_clients.py.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest
import zstandard
from tb import api as tb_api
from tb import datasource as tb_datasource
from tb.a import datasource as tb_async

pytestmark = pytest.mark.timeout(60)

# The curl commands exactly as the documentation prints them (seeds/*.txt); only
# the host and the token placeholders are substituted.
SEED_COMMANDS = {
    "single_ndjson": """curl \\
-H "Authorization: Bearer <your-token>" \\
-d '{"date": "2020-04-05 00:05:38", "city": "Chicago"}' \\
'https://api.europe-west2.gcp.tinybird.co/v0/events?name=events_test'""",
    "batch_ndjson": """curl \\
-H "Authorization: Bearer <import_token>" \\
-d $'{"date": "2020-04-05", "city": "Chicago"}\\n{"date": "2020-04-05", "city": "Madrid"}\\n' \\
'https://api.tinybird.co/v0/events?name=events_test'""",
    "hfi_curl": """curl -i -d $'{"date": "2020-04-05 00:05:38", "city": "Chicago"}\\n{"date": "2020-04-05 00:07:22", "city": "Madrid"}\\n' -H "Authorization: Bearer $TOKEN" '{URL}/v0/events?name=hfi_multiple_events_curl'""",
    "gzip": """echo '{"timestamp":"2022-10-27T11:43:02.099Z","transaction_id":"8d1e1533-6071-4b10-9cda-b8429c1c7a67","name":"Bobby Drake","email":"bobby.drake@pressure.io","age":42,"passport_number":3847665,"flight_from":"Barcelona","flight_to":"London","extra_bags":1,"flight_class":"economy","priority_boarding":false,"meal_choice":"vegetarian","seat_number":"15D","airline":"Red Balloon"}' | gzip > body.gz

curl \\
    -X POST '{% user("apiHost") %}/v0/events?name=gzip_events_example' \\
    -H "Authorization: Bearer <AUTH_TOKEN>" \\
    -H "Content-Encoding: gzip" \\
    --data-binary @body.gz""",
    "no_wait": """curl \\
    -X POST 'https://api.tinybird.co/v0/events?name=events_example' \\
    -H "Authorization: Bearer <AUTH_TOKEN>" \\
    -d $'{"timestamp":"2022-10-27T11:43:02.099Z"}'""",
    "wait": """curl \\
    -X POST 'https://api.tinybird.co/v0/events?name=events_example&wait=true' \\
    -H "Authorization: Bearer <AUTH_TOKEN>" \\
    -d $'{"timestamp":"2022-10-27T11:43:02.099Z"}'""",
    "json_format": """curl \\
    -H "Authorization: Bearer <import_token>" \\
    -d $'{ \\
          "date": "2020-04-05 00:05:38", \\
          "city": "Chicago" \\
        }' \\
    '{% user("apiHost") %}/v0/events?name=events_test&format=json'""",
    "many_ndjson": """curl \\
    -H "Authorization: Bearer <import_token>" \\
    -d $'{"date": "2020-04-05 00:05:38", "city": "Chicago"}\\n{"date": "2020-04-05 00:07:22", "city": "Madrid"}\\n' \\
    '{% user("apiHost") %}/v0/events?name=events_test'""",
    "zstd": """curl \\
    -H "Authorization: Bearer <import_token>" \\
    -H "Content-Encoding: zstd" \\
    --data-binary @body.ndjson.zst \\
    '{% user("apiHost") %}/v0/events?name=events_example'""",
    "send_events": """curl \\
-H "Authorization: Bearer <import_token>" \\
-d $'{"date": "2020-04-05", "city": "Chicago"}\\n{"date": "2020-04-05", "city": "Madrid"}\\n' \\
'{% user("apiHost", "https://api.tinybird.co") %}/v0/events?name=<data_source_name>'""",
}

# name -> (expected status, expected successful_rows)
EXPECTED = {
    "single_ndjson": (202, 1),
    "batch_ndjson": (202, 2),
    "hfi_curl": (202, 2),
    "gzip": (202, 1),
    "no_wait": (202, 1),
    "wait": (200, 1),
    "json_format": (202, 1),
    "many_ndjson": (202, 2),
    "zstd": (202, 3),
    "send_events": (202, 2),
}


def _substitute(command: str, url: str, token: str) -> str:
    for host in (
        '{% user("apiHost", "https://api.tinybird.co") %}',
        '{% user("apiHost") %}',
        "https://api.europe-west2.gcp.tinybird.co",
        "https://api.tinybird.co",
        "{URL}",
    ):
        command = command.replace(host, url)
    for placeholder in ("<your-token>", "<import_token>", "<AUTH_TOKEN>"):
        command = command.replace(placeholder, token)
    return command.replace("<data_source_name>", "docs_events")


@pytest.mark.parametrize("name", list(SEED_COMMANDS))
def test_documented_curl_commands(server, tmp_path, name):
    (tmp_path / "body.ndjson.zst").write_bytes(
        zstandard.ZstdCompressor().compress(
            b'{"timestamp":"2022-10-27T11:43:02.099Z"}\n' * 3
        )
    )
    command = _substitute(SEED_COMMANDS[name], server.url, server.token)
    before = server.stats()["rows"]["stored"]
    done = subprocess.run(
        ["bash", "-c", command + " -w '\\n%{http_code}'"],
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        env={"TOKEN": server.token, "PATH": "/usr/bin:/bin:/usr/local/bin"},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().strip().splitlines()
    status, body = int(lines[-1]), lines[-2]
    expected_status, expected_rows = EXPECTED[name]
    assert (status, body) == (expected_status, f'{{"successful_rows":{expected_rows},"quarantined_rows":0}}')
    if name == "hfi_curl":  # -i prints the headers
        assert any(line.lower().startswith("x-ratelimit-limit:") for line in lines)
    server.flush()
    assert server.stats()["rows"]["stored"] - before == expected_rows


def test_tinybird_python_sdk_datasource(server):
    with tb_datasource.Datasource("sdk_events", server.token, api_url=server.url) as ds:
        ds << {"date": "2020-04-05 00:05:38", "city": "Chicago"}
        ds << {"date": "2020-04-05 00:07:22", "city": "Madrid"}
        ds.append('{"date": "2020-04-05 00:09:00", "city": "Tokyo"}')
    server.flush()
    assert server.query("SELECT city FROM sdk_events ORDER BY date") == [
        {"city": "Chicago"},
        {"city": "Madrid"},
        {"city": "Tokyo"},
    ]


def test_tinybird_python_sdk_api_reads_rate_limit_headers(server):
    api = tb_api.API(server.token, server.url)
    response = api.post("/events?name=sdk_api&wait=true", data='{"a": 1}\n{"a": 2}\n')
    assert response.status_code == 200
    assert response.json() == {"successful_rows": 2, "quarantined_rows": 0}
    assert api.rate_limit_points == 1_000_000_000  # parsed from our X-RateLimit-* headers
    assert api.rate_limit_remaining > 0
    assert server.query("SELECT sum(a) AS s FROM sdk_api") == [{"s": 3}]


def test_tinybird_python_sdk_async_datasource(server):
    async def send() -> None:
        async with tb_async.AsyncDatasource("sdk_async", server.token, api_url=server.url) as ds:
            await ds.append({"n": 1})
            await ds.append({"n": 2})
            # close() in 0.3.7 sets its shutdown flag before flushing, which then sends nothing.
            await ds.flush()

    asyncio.run(send())
    server.flush()
    assert server.query("SELECT count(*) AS c, sum(n) AS s FROM sdk_async") == [{"c": 2, "s": 3}]


def test_curl_large_bodies_use_expect_100_continue(server, tmp_path, ds):
    """curl sends ``Expect: 100-continue`` for large bodies: an oversized one is refused before it is sent."""
    line = b'{"i": 1, "s": "' + b"x" * 982 + b'"}\n'
    assert len(line) == 1_000
    (tmp_path / "ok.ndjson").write_bytes(line * 9_000)  # 9 MB
    (tmp_path / "big.ndjson").write_bytes(line * 10_001)  # just over 10 MB
    url = f"{server.url}/v0/events?name={ds}&wait=true"
    command = [
        "curl", "-s", "-o", "-", "-w", " %{http_code}\n", "-H", f"Authorization: Bearer {server.token}",
        "--data-binary", "@big.ndjson", url,
        "--next", "-s", "-o", "-", "-w", " %{http_code}\n", "-H", f"Authorization: Bearer {server.token}",
        "--data-binary", "@ok.ndjson", url,
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.decode().strip().splitlines()
    assert first.endswith(" 413") and '"error"' in first
    assert second == '{"successful_rows":9000,"quarantined_rows":0} 200'
    assert server.query(f"SELECT count(*) AS n FROM {ds}") == [{"n": 9000}]
