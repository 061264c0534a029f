"""Files to Tinybird against a local server: every runner, every format, the embedded default."""

from __future__ import annotations

import datetime
import decimal
import gzip
import json
import os
import re
import subprocess
import sys

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipelines_testlib import RUNNERS, count, run_quietly, sink_flags
from shared_testlib import dead_letters_in

from pipelines._options import UsageError
from pipelines.files_to_tinybird import SAMPLE_DATA, run
from pipelines.sample_data import generate as sample
from tinybird_emulator import LocalServer

REPO_ROOT = SAMPLE_DATA.parents[2]


def _sample_facts():
    """What the sample file holds, read from the file itself."""
    rows, unsendable, quarantined = [], [], []
    for line in SAMPLE_DATA.read_text(encoding="utf-8").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            unsendable.append(line)
            continue
        if not isinstance(value, dict):
            unsendable.append(line)
            continue
        rows.append(value)
        if value["timestamp"].startswith("0000-") or "-13-" in value["timestamp"]:
            quarantined.append(value)
    return rows, unsendable, quarantined


def test_sample_data_is_the_seeded_generators_output_and_small():
    lines = sample.generate()
    assert SAMPLE_DATA.read_text(encoding="utf-8") == "\n".join(lines) + "\n"
    assert SAMPLE_DATA.stat().st_size < 2 * 1024 * 1024
    rows, unsendable, quarantined = _sample_facts()
    assert len(lines) == sample.ROWS == 5000
    assert len(unsendable) == sample.UNSENDABLE == 2
    assert len(quarantined) == sample.QUARANTINED == 10
    # The first rows are clean and show every field, nested ones included.
    first = rows[0]
    assert first["event_type"] == "purchase" and set(first["purchase"]) == {
        "order_id", "amount", "currency", "items", "coupon_used"}
    assert all(set(row) - {"purchase"} == set(first) - {"purchase"} for row in rows)


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_sample_data_on_every_runner(server, datasource, runner, tmp_path):
    dead_dir = tmp_path / "dead"
    summary, printed = run_quietly(run, sink_flags(
        server, datasource, "--dead_letter_path", f"{dead_dir}/", *RUNNERS[runner]))
    rows, _unsendable, quarantined = _sample_facts()

    stored = count(server, datasource)
    assert stored == len(rows) - len(quarantined) == 4988
    assert count(server, f"{datasource}_quarantine") == len(quarantined) == 10
    assert summary.rows_read == 5000
    assert summary.rows_acknowledged == 4998
    assert summary.rows_quarantined == 10
    assert summary.dead_letters == 2 and summary.dead_letters_by_kind == {"unencodable": 2}
    assert summary.rows_stored == stored == summary.rows_read - summary.dead_letters - summary.rows_quarantined

    letters = dead_letters_in(dead_dir)
    assert len(letters) == 2 and {letter.kind for letter in letters} == {"unencodable"}
    assert all(letter.line is None and letter.datasource == datasource and letter.attempts == 0
               for letter in letters)
    messages = sorted(letter.message for letter in letters)
    assert messages[0] == "JSON value is a list, not an object"
    assert messages[1].startswith("invalid JSON")
    assert sorted(summary.dead_letter_files) == sorted(
        str(p) for p in dead_dir.iterdir() if not p.name.startswith("."))

    quarantined_times = sorted(r["timestamp"] for r in server.query(
        f"SELECT timestamp FROM {datasource}_quarantine"))
    assert quarantined_times == sorted(row["timestamp"] for row in quarantined)
    first = rows[0]
    stored_first = server.query(
        f"SELECT event_type, user_country, purchase_amount, purchase_currency, product_ids "
        f"FROM {datasource} WHERE event_id = '{first['event_id']}'")
    assert len(stored_first) == 1
    assert stored_first[0]["purchase_amount"] == first["purchase"]["amount"]
    assert stored_first[0]["purchase_currency"] == first["purchase"]["currency"]
    assert stored_first[0]["user_country"] == first["user"]["country"]
    assert stored_first[0]["product_ids"] == first["product_ids"]
    assert "rows read                 5,000" in printed


def test_ndjson_compressed_with_blank_and_broken_lines(server, datasource, tmp_path):
    path = tmp_path / "events.ndjson.gz"
    lines = [json.dumps({"id": i, "tags": ["a", "b"], "user": {"name": f"u{i}"}}) for i in range(50)]
    body = "\n".join(lines[:25]) + "\n\n   \n" + '{"id": 99, "tags": [' + "\n" + "\n".join(lines[25:]) + "\n"
    path.write_bytes(gzip.compress(body.encode()))
    dead_dir = tmp_path / "dead"

    summary, _ = run_quietly(run, sink_flags(
        server, datasource, "--input", str(path), "--dead_letter_path", str(dead_dir)))

    assert [r["id"] for r in server.query(f"SELECT id FROM {datasource} ORDER BY id")] == list(range(50))
    assert server.query(f"SELECT user_name FROM {datasource} WHERE id = 7") == [{"user_name": "u7"}]
    assert summary.rows_read == 51 and summary.dead_letters == 1
    (letter,) = dead_letters_in(dead_dir)
    assert letter.kind == "unencodable" and letter.message.startswith("invalid JSON")
    assert '{"id": 99, "tags": [' in letter.element


def test_explicit_format_overrides_the_extension(server, datasource, tmp_path):
    path = tmp_path / "export.txt"
    path.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(5)))
    summary, _ = run_quietly(run, sink_flags(server, datasource, "--input", str(path), "--format", "ndjson"))
    assert count(server, datasource) == 5 == summary.rows_read


def test_json_files_array_object_and_ndjson(server, datasource, tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(
        [{"id": 1, "city": "Madrid", "visits": [1, 2]}, {"id": 2, "city": "Chicago", "visits": []}, 7]))
    (tmp_path / "b.json").write_text(json.dumps({"id": 3, "city": "Lima", "visits": [3]}, indent=2))
    (tmp_path / "c.json").write_text(
        '{"id": 4, "city": "Oslo", "visits": [4]}\n{"id": 5, "city": "Rome", "visits": [5]}\n')
    dead_dir = tmp_path / "dead"

    summary, _ = run_quietly(run, sink_flags(
        server, datasource, "--input", str(tmp_path / "*.json"), "--dead_letter_path", str(dead_dir)))

    stored = server.query(f"SELECT id, city, visits FROM {datasource} ORDER BY id")
    assert [(r["id"], r["city"], r["visits"]) for r in stored] == [
        (1, "Madrid", [1, 2]), (2, "Chicago", []), (3, "Lima", [3]), (4, "Oslo", [4]), (5, "Rome", [5])]
    assert summary.rows_read == 6 and summary.dead_letters == 1
    (letter,) = dead_letters_in(dead_dir)
    assert letter.message == "JSON value is a number, not an object"


def test_csv_typed_values_quoted_newlines_and_ragged_rows(server, datasource, tmp_path):
    (tmp_path / "orders.csv").write_text(
        "\ufefforder_id,zip,amount,paid,note,items\n"
        '1,00501,12.50,true,"first, with comma",3\n'
        '2,10001,7,FALSE,"two\nlines",\n'
        "3,94103,-1.5e2,false,,2\n"
        "4,02134,0.25,true\n"
        "5,60601,1,true,too,many,values\n",
        encoding="utf-8")
    dead_dir = tmp_path / "dead"

    summary, _ = run_quietly(run, sink_flags(
        server, datasource, "--input", str(tmp_path / "*.csv"), "--dead_letter_path", str(dead_dir)))

    stored = server.query(f"SELECT order_id, zip, amount, paid, note, items FROM {datasource} ORDER BY order_id")
    assert stored == [
        {"order_id": 1, "zip": "00501", "amount": 12.5, "paid": 1, "note": "first, with comma", "items": 3},
        {"order_id": 2, "zip": "10001", "amount": 7.0, "paid": 0, "note": "two\nlines", "items": None},
        {"order_id": 3, "zip": "94103", "amount": -150.0, "paid": 0, "note": None, "items": 2},
        {"order_id": 4, "zip": "02134", "amount": 0.25, "paid": 1, "note": None, "items": None},
    ]
    columns = {c["name"]: c["type"] for c in server.datasources()[datasource]["columns"]}
    assert columns["order_id"] == "Int64" and columns["zip"] == "String"
    assert columns["amount"] == "Float64" and columns["paid"] == "Bool"
    assert summary.rows_read == 5 and summary.dead_letters == 1
    (letter,) = dead_letters_in(dead_dir)
    assert letter.kind == "unencodable" and "7 values for 6 columns" in letter.element
    assert "5,60601,1,true,too,many,values" in letter.element


def test_avro_records_nested_logical_types_and_bytes(server, datasource, tmp_path):
    schema = {
        "type": "record", "name": "Event", "fields": [
            {"name": "id", "type": "long"},
            {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 8, "scale": 2}},
            {"name": "payload", "type": "bytes"},
            {"name": "user", "type": {"type": "record", "name": "User", "fields": [
                {"name": "id", "type": "string"}, {"name": "premium", "type": "boolean"}]}},
            {"name": "tags", "type": {"type": "array", "items": "string"}},
            {"name": "note", "type": ["null", "string"], "default": None},
        ]}
    base = datetime.datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=datetime.UTC)
    records = [{
        "id": i, "at": base + datetime.timedelta(seconds=i), "price": decimal.Decimal("10.05") * (i + 1),
        "payload": bytes([i, 255]), "user": {"id": f"u{i}", "premium": i % 2 == 0},
        "tags": ["x"] * i, "note": None if i % 2 else "hello",
    } for i in range(4)]
    with open(tmp_path / "events.avro", "wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(schema), records)

    summary, _ = run_quietly(run, sink_flags(server, datasource, "--input", str(tmp_path / "*.avro")))

    stored = server.query(
        f"SELECT id, at, price, payload, user_id, user_premium, tags, note FROM {datasource} ORDER BY id")
    assert [r["id"] for r in stored] == [0, 1, 2, 3] and summary.rows_read == 4 == summary.rows_acknowledged
    assert stored[1]["at"] == "2024-05-01 12:00:01.123"
    assert stored[2]["price"] == 30.15
    assert stored[1]["payload"] == "Af8="  # base64 of b"\x01\xff"
    assert (stored[3]["user_id"], stored[3]["user_premium"]) == ("u3", 0)
    assert stored[2]["tags"] == ["x", "x"]
    assert [r["note"] for r in stored] == ["hello", None, "hello", None]


def test_parquet_records_struct_list_decimal_timestamp_binary(server, datasource, tmp_path):
    table = pa.table({
        "id": pa.array([1, 2, 3], pa.int64()),
        "at": pa.array([datetime.datetime(2024, 5, 1, 8, 30, tzinfo=datetime.UTC)] * 3,
                       pa.timestamp("ms", tz="UTC")),
        "amount": pa.array([decimal.Decimal("1.10"), decimal.Decimal("2.25"), None], pa.decimal128(6, 2)),
        "purchase": pa.array([{"currency": "EUR", "items": 1}, {"currency": "USD", "items": 2},
                              {"currency": "GBP", "items": 3}]),
        "skus": pa.array([["a"], ["b", "c"], []], pa.list_(pa.string())),
        "blob": pa.array([b"\x00", b"ok", b""], pa.binary()),
    })
    pq.write_table(table, tmp_path / "part-0.parquet")
    pq.write_table(table.slice(0, 1).set_column(0, "id", pa.array([4], pa.int64())), tmp_path / "part-1.parquet")

    summary, _ = run_quietly(run, sink_flags(server, datasource, "--input", str(tmp_path / "part-*.parquet")))

    stored = server.query(
        f"SELECT id, at, amount, purchase_currency, purchase_items, skus, blob FROM {datasource} ORDER BY id")
    assert [r["id"] for r in stored] == [1, 2, 3, 4] and summary.rows_read == 4
    assert stored[0]["at"] == "2024-05-01 08:30:00"
    assert [r["amount"] for r in stored] == [1.1, 2.25, None, 1.1]
    assert [r["purchase_currency"] for r in stored] == ["EUR", "USD", "GBP", "EUR"]
    assert stored[1]["skus"] == ["b", "c"]
    assert [r["blob"] for r in stored] == ["AA==", "b2s=", "", "AA=="]


def test_input_that_cannot_be_read_is_refused_before_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.bin").write_bytes(b"{}")
    with pytest.raises(UsageError, match="cannot tell the format"):
        run(["--input", str(tmp_path / "data.bin")])
    with pytest.raises(UsageError, match="no file matches"):
        run(["--input", str(tmp_path / "missing-*.ndjson")])
    with pytest.raises(UsageError, match="--datasource is required with --api_url"):
        run(["--input", str(tmp_path / "data.bin"), "--api_url", "https://api.tinybird.co"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]  # no server was started


def test_command_line_errors_exit_with_status_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.files_to_tinybird", "--input", str(tmp_path / "nothing-*.csv")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 2
    assert "error: no file matches --input" in result.stderr


def test_embedded_default_runs_the_sample_and_prints_the_summary(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("TINYBIRD_TOKEN", None)
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.files_to_tinybird"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout

    def figure(label: str) -> int:
        match = re.search(rf"^  {label}\s+([\d,]+)", out, re.MULTILINE)
        assert match, f"no {label!r} line in:\n{out}"
        return int(match.group(1).replace(",", ""))

    assert figure("rows read") == 5000
    assert figure("rows acknowledged") == 4998
    assert figure("rows quarantined") == 10
    assert figure("rows stored") == 4988
    assert figure("dead letters") == 2
    assert "(unencodable: 2)" in out
    listed = re.findall(r"^    (\./dead-letters/dead-letters-\S+\.jsonl)$", out, re.MULTILINE)
    assert len(listed) == 1 and (tmp_path / listed[0]).is_file()
    assert "events now holds 4,988 rows (10 quarantined) in ./tinybird-local" in out
    # tmp_path is not under the interpreter's folder: its full path is shown.
    shown = re.findall(rf'^  {re.escape(sys.executable)} (-m tinybird_emulator sql --data-dir \./tinybird-local) "(SELECT [^"]+)"$',
                       out, re.MULTILINE)
    assert [query for _, query in shown] == [
        "SELECT count(*) FROM events", "SELECT c__error_column, c__error FROM events_quarantine LIMIT 5"]
    # The command works as printed, from where the job ran.
    looked = subprocess.run([sys.executable, *shown[0][0].split(), shown[0][1]],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert looked.returncode == 0, looked.stderr
    assert json.loads(looked.stdout)["data"] == [{"count(*)": 4988}]
    assert "tb_local_" not in out + result.stderr  # the run's admin token is never shown
    assert len(dead_letters_in(tmp_path / "dead-letters")) == 2

    # A second run adds to the same data source; its summary lists only its own files.
    again = subprocess.run(
        [sys.executable, "-m", "pipelines.files_to_tinybird"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "events now holds 9,976 rows (20 quarantined)" in again.stdout
    relisted = re.findall(r"^    (\./dead-letters/dead-letters-\S+\.jsonl)$", again.stdout, re.MULTILINE)
    assert len(relisted) == 1 and relisted != listed
    assert len(dead_letters_in(tmp_path / "dead-letters")) == 4

    # The data stays in ./tinybird-local: a server started on it, as the summary says, sees it.
    with LocalServer(data_dir=tmp_path / "tinybird-local", token="local-admin") as local:
        assert local.query("SELECT count(*) AS n FROM events") == [{"n": 9976}]
        assert local.query("SELECT count(*) AS n FROM events_quarantine") == [{"n": 20}]


# -- a data source per row: --datasource_field ------------------------------------------------

def test_datasource_field_sends_each_row_to_its_types_data_source(server, datasource, tmp_path):
    types = ("click", "view", "purchase")
    rows = [{"id": i, "type": types[i % 3], "n": i * 2} for i in range(300)]
    unroutable = [{"id": 1000, "n": 0}, {"id": 1001, "type": 7}, {"id": 1002, "type": "bad-name"},
                  {"id": 1003, "type": "x_quarantine"}]
    lines = [json.dumps(row) for row in rows[:150] + unroutable + rows[150:]]
    (tmp_path / "in.ndjson").write_text("\n".join(lines) + "\n")
    prefix = f"{datasource}_"
    dead_dir = tmp_path / "dead"

    summary, printed = run_quietly(run, [
        "--api_url", server.url, "--token", server.token, "--wait", "--num_shards", "2",
        "--datasource_field", "type", "--datasource_prefix", prefix, "--max_batch_rows", "40",
        "--input", str(tmp_path / "in.ndjson"), "--dead_letter_path", f"{dead_dir}/"])

    server.flush()
    for kind in types:
        stored = server.query(f"SELECT id, type, n FROM {prefix}{kind} ORDER BY id")
        assert stored == [row for row in rows if row["type"] == kind]  # exactly its rows, no foreign ones
    assert summary.rows_read == 304 and summary.rows_acknowledged == 300
    assert summary.dead_letters == 4 and summary.dead_letters_by_kind == {"unroutable": 4}
    assert {name: (f.rows_acknowledged, f.dead_letters) for name, f in summary.by_datasource.items()
            if f.rows_acknowledged} == {f"{prefix}{kind}": (100, 0) for kind in types}
    letters = {json.loads(d.line)["id"]: d for d in dead_letters_in(dead_dir)}
    assert sorted(letters) == [1000, 1001, 1002, 1003]
    assert all(d.kind == "unroutable" and d.attempts == 0 for d in letters.values())
    assert (letters[1000].datasource, letters[1001].datasource) == ("", "")
    assert "KeyError" in letters[1000].message and "'type'" in letters[1000].message
    assert "int" in letters[1001].message
    assert letters[1002].datasource == f"{prefix}bad-name" and "must match" in letters[1002].message
    assert letters[1003].datasource == f"{prefix}x_quarantine" and "quarantine" in letters[1003].message
    assert printed.splitlines()[0].endswith(f"data sources from field 'type', prefixed '{prefix}' at {server.url}")
    for kind in types:
        assert re.search(rf"^    {prefix}{kind}\s+100\s+0$", printed, re.MULTILINE)


def test_sample_data_by_type(server, datasource, tmp_path):
    dead_dir = tmp_path / "dead"
    prefix = f"{datasource}_"
    summary, _ = run_quietly(run, [
        "--api_url", server.url, "--token", server.token, "--wait", "--num_shards", "2",
        "--datasource_field", "type", "--datasource_prefix", prefix, "--dead_letter_path", f"{dead_dir}/"])
    rows, _unsendable, quarantined = _sample_facts()

    for kind in sorted(set(sample.TYPES.values())):
        mine = [row for row in rows if row["type"] == kind]
        mine_quarantined = [row for row in quarantined if row["type"] == kind]
        assert count(server, f"{prefix}{kind}") == len(mine) - len(mine_quarantined)
        assert count(server, f"{prefix}{kind}_quarantine") == len(mine_quarantined)
        assert server.query(f"SELECT DISTINCT type FROM {prefix}{kind}") == [{"type": kind}]
        stored_ids = sorted(r["event_id"] for r in server.query(f"SELECT event_id FROM {prefix}{kind}"))
        assert stored_ids == sorted(r["event_id"] for r in mine if r not in mine_quarantined)
    assert summary.rows_read == 5000 and summary.rows_acknowledged == 4998 and summary.rows_quarantined == 10
    # The two lines that are not a JSON object have no field to read: unroutable, and never sent.
    assert summary.dead_letters_by_kind == {"unroutable": 2}
    assert all(d.kind == "unroutable" and d.line is None and d.datasource == "" for d in dead_letters_in(dead_dir))


def test_the_demo_by_type_on_the_embedded_server(tmp_path, monkeypatch):
    """``./dev demo --datasource_field type``: one data source per type, each listed with what it holds."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TINYBIRD_TOKEN", raising=False)
    summary, printed = run_quietly(run, ["--datasource_field", "type"])
    rows, _unsendable, quarantined = _sample_facts()

    held = {}
    with LocalServer(data_dir=tmp_path / "tinybird-local", token="local-admin") as local:
        for kind in ("pageviews", "commerce", "searches"):
            held[kind] = local.query(f"SELECT count(*) AS n FROM {kind}")[0]["n"]
        assert "events" not in local.datasources()
    expected = {kind: sum(1 for r in rows if r["type"] == kind and r not in quarantined) for kind in held}
    assert held == expected and sum(held.values()) == 4988
    assert summary.rows_stored == 4988 and summary.dead_letters_by_kind == {"unroutable": 2}
    for kind in held:
        stored_quarantined = sum(1 for r in quarantined if r["type"] == kind)
        assert f"  {kind} now holds {held[kind]:,} rows ({stored_quarantined} quarantined) in ./tinybird-local" in printed
        assert f'-m tinybird_emulator sql --data-dir ./tinybird-local "SELECT count(*) FROM {kind}"' in printed
    # The biggest data source first.
    assert printed.index("  pageviews now holds") < printed.index("  commerce now holds") < printed.index("  searches now holds")
