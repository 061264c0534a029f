"""Files to Tinybird against a local server: every runner, every format, the embedded default."""

from __future__ import annotations

import bz2
import datetime
import decimal
import gzip
import json
import lzma
import os
import re
import subprocess
import sys
import zlib

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from pipelines_testlib import RUNNERS, count, run_quietly, sink_flags
from shared_testlib import dead_letters_in

from pipelines import _formats
from pipelines._formats import COMPRESSIBLE_FORMATS, CSV_MAX_FIELD_CHARS
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


# -- every row read is stored or dead-lettered: compressed files, bad records, exact numbers ------

def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


COMPRESSORS = {
    ".gz": gzip.compress, ".bz2": bz2.compress, ".zst": _zstd, ".zstd": _zstd, ".deflate": zlib.compress,
    ".xz": lzma.compress, ".lzma": lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE),
}
GOOD_ROWS = [{"id": i, "name": f"n{i}"} for i in range(40)]
# Each format's file: the good rows with one bad record among them, and what its dead letter shows.
BAD_RECORD_FILES = {
    "ndjson": ("".join(json.dumps(r) + "\n" for r in GOOD_ROWS[:20]) + '{"id": 99, "name": \n'
               + "".join(json.dumps(r) + "\n" for r in GOOD_ROWS[20:]), '{"id": 99, "name": '),
    "json": (json.dumps([*GOOD_ROWS[:20], 7, *GOOD_ROWS[20:]]), "b'7'"),
    "csv": ("id,name\n" + "".join(f"{r['id']},{r['name']}\n" for r in GOOD_ROWS[:20]) + "99,x,too many\n"
            + "".join(f"{r['id']},{r['name']}\n" for r in GOOD_ROWS[20:]), "3 values for 2 columns"),
}


def test_the_compressions_tested_are_every_one_beam_reads():
    assert set(COMPRESSORS) == set(_formats._COMPRESSION_SUFFIXES)
    assert set(BAD_RECORD_FILES) == set(COMPRESSIBLE_FORMATS)


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
@pytest.mark.parametrize("file_format", COMPRESSIBLE_FORMATS)
def test_every_compression_of_every_format_that_may_be_compressed(server, datasource, tmp_path, file_format, suffix):
    text, shown = BAD_RECORD_FILES[file_format]
    path = tmp_path / f"rows.{file_format}{suffix}"
    path.write_bytes(COMPRESSORS[suffix](text.encode()))
    dead_dir = tmp_path / "dead"

    summary, _ = run_quietly(run, sink_flags(  # the format from the extension, behind the suffix
        server, datasource, "--input", str(path), "--dead_letter_path", f"{dead_dir}/"))

    assert server.query(f"SELECT id, name FROM {datasource} ORDER BY id") == GOOD_ROWS
    assert summary.rows_read == 41 == summary.rows_acknowledged + summary.dead_letters
    assert summary.rows_acknowledged == 40 and summary.dead_letters == 1
    (letter,) = dead_letters_in(dead_dir)
    assert letter.kind == "unencodable" and shown in letter.element


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".zst", ".xz", ".deflate"])  # each decompressor
@pytest.mark.parametrize("file_format", COMPRESSIBLE_FORMATS)
def test_a_compressed_file_cut_short_ends_in_a_dead_letter_saying_so(
        server, datasource, tmp_path, file_format, suffix):
    rows = [{"id": i, "name": f"n{i}"} for i in range(2000)]
    if file_format == "csv":
        text = "id,name\n" + "".join(f"{r['id']},{r['name']}\n" for r in rows)
    else:  # NDJSON, and a .json file of JSON lines (as BigQuery exports them)
        text = "".join(json.dumps(r) + "\n" for r in rows)
    whole = COMPRESSORS[suffix](text.encode())
    path = tmp_path / f"rows.{file_format}{suffix}"
    path.write_bytes(whole[: len(whole) // 2])  # an interrupted upload
    dead_dir = tmp_path / "dead"

    summary, _ = run_quietly(run, sink_flags(
        server, datasource, "--input", str(path), "--dead_letter_path", f"{dead_dir}/"))

    assert summary.rows_read == summary.rows_acknowledged + summary.dead_letters
    letters = dead_letters_in(dead_dir)
    cut = [d for d in letters if "the compressed data stops before its end (a truncated file)" in d.element]
    assert len(cut) == 1 and cut[0].kind == "unencodable"
    # What was stored is the file's first rows, whole: no row made of half a line.
    stored = server.query(f"SELECT id, name FROM {datasource} ORDER BY id") if summary.rows_acknowledged else []
    assert stored == rows[: len(stored)] and len(stored) < len(rows)
    # Besides the one saying so, at most the line the cut went through (a .json file's lines).
    assert len(letters) - 1 <= (file_format == "json")


@pytest.mark.parametrize("damage", ["zero padding after the end", "bytes overwritten in the middle"])
@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".zst", ".xz", ".deflate"])  # each decompressor
@pytest.mark.parametrize("file_format", COMPRESSIBLE_FORMATS)
def test_corrupt_compressed_data_ends_in_a_dead_letter_saying_so(
        server, datasource, tmp_path, file_format, suffix, damage):
    """A decompressor's error (zlib.error, LZMAError, ZstdError, bz2's OSError) failed the job, after the batches
    of the rows before it were posted (a rerun stores them twice): it now ends the file's rows with
    a dead letter saying what was lost, as a file cut short does."""
    rows = [{"id": i, "name": f"n{i}"} for i in range(2000)]
    if file_format == "csv":
        text = "id,name\n" + "".join(f"{r['id']},{r['name']}\n" for r in rows)
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    whole = COMPRESSORS[suffix](text.encode())
    if damage == "zero padding after the end":
        data = whole + bytes(512)
    else:
        middle = len(whole) // 2
        data = whole[:middle] + bytes(range(256)) * 4 + whole[middle + 1024:]
    path = tmp_path / f"rows.{file_format}{suffix}"
    path.write_bytes(data)
    dead_dir = tmp_path / "dead"

    # The only file: what is lost may be most of its rows (a decompressor that is handed the whole
    # file at once returns nothing before the error), which fails the default ratio: judged here.
    summary, _ = run_quietly(run, sink_flags(
        server, datasource, "--input", str(path), "--dead_letter_path", f"{dead_dir}/", "--max_dead_letter_ratio", "1"))

    assert summary.failure is None
    assert summary.rows_read == summary.rows_acknowledged + summary.dead_letters
    letters = dead_letters_in(dead_dir)
    stored = server.query(f"SELECT id, name FROM {datasource} ORDER BY id") if summary.rows_acknowledged else []
    assert stored == rows[: len(stored)]  # the file's first rows, whole
    said = [d for d in letters if "what followed is lost" in d.element]
    assert all(d.kind == "unencodable" for d in said)
    if damage == "bytes overwritten in the middle":
        # Said to be corrupt, or (bz2, whose damaged block never ends: libbz2 gives neither data nor
        # an error) to stop before its end.
        expected = ("the compressed data is corrupt (",) + (("the compressed data stops before its end",)
                                                            if suffix == ".bz2" else ())
        assert len(stored) < len(rows) and len(said) == 1 and said[0].element.count(expected[0]) + sum(
            text in said[0].element for text in expected[1:]) == 1
    else:
        # Said to be corrupt (zlib, zstd: the rows decompressed in the read that met the padding are
        # lost with it, and the dead letter says after which line), or taken for a stream cut short
        # once every row was read (xz, whose stream padding Beam reads as the start of another stream).
        assert len(said) == 1 and ("the compressed data is corrupt (" in said[0].element or len(stored) == len(rows))
    assert len(letters) - len(said) <= (file_format == "json")  # at most the line the damage went through


def _whole_lines(data: bytes) -> list[bytes]:
    """The lines of ``data`` that end with a newline (a cut file's last line is lost, and said to be)."""
    return data[: data.rfind(b"\n") + 1].splitlines()


def test_a_glob_without_a_compression_suffix_reads_a_compressed_file_cut_short_as_strictly(
        server, datasource, tmp_path):
    # --input 'export/part-*': ReadFromText decompressed each file by its own suffix and ended
    # quietly where one stopped short (half of the .gz's rows, none of the .zst's, no dead letter).
    export = tmp_path / "export"
    export.mkdir()
    plain = [{"id": i, "name": f"p{i}"} for i in range(1000)]
    (export / "part-0").write_text("".join(json.dumps(r) + "\n" for r in plain))
    readable: list[bytes] = []
    cut_files = {}
    for number, (suffix, decompressor) in enumerate(
            [(".gz", zlib.decompressobj(wbits=31)), (".zst", zstandard.ZstdDecompressor().decompressobj())], 1):
        text = "".join(json.dumps({"id": number * 10_000 + i, "name": f"c{i}"}) + "\n" for i in range(2000))
        whole = COMPRESSORS[suffix](text.encode())
        path = export / f"part-{number}{suffix}"
        path.write_bytes(whole[: len(whole) // 2])  # an interrupted upload
        lines = _whole_lines(decompressor.decompress(whole[: len(whole) // 2]))
        readable.extend(lines)
        cut_files[str(path)] = len(lines)
    assert len(readable) > 500  # half of the .gz is readable, and read
    dead_dir = tmp_path / "dead"

    summary, _ = run_quietly(run, sink_flags(
        server, datasource, "--input", str(export / "part-*"), "--format", "ndjson",
        "--dead_letter_path", f"{dead_dir}/"))

    stored = server.query(f"SELECT id, name FROM {datasource} ORDER BY id")
    assert stored == plain + sorted((json.loads(line) for line in readable), key=lambda r: r["id"])
    assert (summary.rows_read, summary.rows_acknowledged, summary.dead_letters) == (
        len(plain) + len(readable) + 2, len(plain) + len(readable), 2)
    letters = dead_letters_in(dead_dir)
    assert sorted(d.element for d in letters) == sorted(
        f"UnreadableRecord({path} after line {lines}: {_formats._CUT_SHORT}; text='')"
        for path, lines in cut_files.items())
    assert {d.kind for d in letters} == {"unencodable"}


def test_a_glob_matching_plain_and_compressed_files_reads_every_row_once(server, datasource, tmp_path, monkeypatch):
    # Each uncompressed file is read in ranges of this many bytes, as on a cluster: no row is read
    # twice where a range ends inside it, nor lost.
    monkeypatch.setattr(_formats, "_RANGE_BYTES", 4096)
    export = tmp_path / "export"
    export.mkdir()
    rows = [{"id": i, "name": f"n{i}" * (i % 7)} for i in range(6000)]

    def ndjson(part: list[dict], line_end: str = "\n") -> bytes:
        return "".join(json.dumps(r) + line_end + ("\n" if r["id"] % 100 == 0 else "") for r in part).encode()

    (export / "part-0").write_bytes(ndjson(rows[:2000]))  # about 25 ranges, with blank lines
    (export / "part-1.ndjson").write_bytes(ndjson(rows[2000:3000], "\r\n"))
    (export / "part-2.gz").write_bytes(gzip.compress(ndjson(rows[3000:4000])))
    (export / "part-3.zst").write_bytes(_zstd(ndjson(rows[4000:5000], "\r\n")))
    # A name holding glob characters is read as itself, not as a pattern matching part-4.
    (export / "part-[4]").write_bytes(ndjson(rows[5000:5500]))
    (export / "part-4").write_bytes(ndjson(rows[5500:]))
    (export / "part-5").write_bytes(b"")

    summary, _ = run_quietly(run, sink_flags(
        server, datasource, "--input", str(export / "part-*"), "--format", "ndjson"))

    ids = [r["id"] for r in server.query(f"SELECT id FROM {datasource} ORDER BY id")]
    assert ids == list(range(6000))
    assert (summary.rows_read, summary.rows_acknowledged, summary.dead_letters) == (6000, 6000, 0)
    assert server.query(f"SELECT name FROM {datasource} WHERE id IN (2006, 4006) ORDER BY id") == [
        {"name": "n2006" * 4}, {"name": "n4006" * 2}]  # no \r left on a \r\n line


def test_a_compressed_json_file_larger_than_one_beam_read_is_read_whole(server, datasource, tmp_path):
    # Beam's CompressedFile.read() with no size returns 16 MiB: the rest of the file was dropped.
    rows = [{"id": i, "pad": chr(ord("a") + i) * (1024 * 1024)} for i in range(20)]  # 20 MiB
    (tmp_path / "big.json.gz").write_bytes(gzip.compress(
        "".join(json.dumps(r) + "\n" for r in rows).encode(), compresslevel=1))
    dead_dir = tmp_path / "dead"

    summary, _ = run_quietly(run, sink_flags(
        server, datasource, "--input", str(tmp_path / "big.json.gz"), "--dead_letter_path", f"{dead_dir}/"))

    assert (summary.rows_read, summary.rows_acknowledged, summary.dead_letters) == (20, 20, 0)
    stored = server.query(f"SELECT id, length(pad) AS n, substr(pad, 1, 1) AS c FROM {datasource} ORDER BY id")
    assert stored == [{"id": r["id"], "n": 1024 * 1024, "c": r["pad"][0]} for r in rows]


def test_avro_and_parquet_with_a_compression_suffix_are_refused_before_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, file_format in (("x.avro.gz", "avro"), ("x.parquet.zst", "parquet"), ("data.gz", "avro")):
        (tmp_path / name).write_bytes(b"\x00")
        message = (rf"^--input '.*{re.escape(name)}' is compressed \(\.\w+\), but {file_format} files are "
                   rf"read only uncompressed: .* only ndjson, json, csv files may be compressed$")
        with pytest.raises(UsageError, match=message):
            run(["--input", str(tmp_path / name), *(["--format", file_format] if name == "data.gz" else [])])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.gz", "x.avro.gz", "x.parquet.zst"]


def test_csv_bad_rows_are_dead_lettered_each_on_its_own_and_the_rest_stored(server, datasource, tmp_path):
    (tmp_path / "rows.csv").write_bytes(
        b"\xef\xbb\xbf\r\n   \r\n"                         # lines 1-2: a BOM, a blank line, one of spaces
        b"id,name,name,code\r\n"                             # 3: the header, a name repeated
        b"1,a,b,007\r\n"                                     # 4
        b"2,caf\xe9,c,x\r\n"                                 # 5: not UTF-8 (Latin-1)
        b"3,c,d," + b"9" * 5000 + b"\r\n"                    # 6: too long for an int: kept as text
        b"  \r\n"                                            # 7
        b'4,"d"x,e,y\r\n'                                    # 8: text after a closing quote
        b'5,"' + b"x" * (CSV_MAX_FIELD_CHARS + 1) + b'",f,z\r\n'  # 9: a field over the limit
        b"6,e,f,g,h\r\n"                                     # 10: too many values
        b'7,"two\r\nlines",g,\r\n'                          # 11-12: a quoted line end, an empty value
        b"8\r\n"                                             # 13: values missing
        b'9,"never closed,h,i\r\n10,j,k,l\r\n11,m,n,o\r\n')  # 14-16: a quote never closed
    (tmp_path / "latin1-header.csv").write_bytes(b"id,caf\xe9\n1,2\n3,4\n")
    (tmp_path / "broken-header.csv").write_bytes(b'id,"na"me\n1,a\n')
    dead_dir = tmp_path / "dead"

    summary, _ = run_quietly(run, sink_flags(
        server, datasource, "--input", str(tmp_path / "*.csv"), "--dead_letter_path", f"{dead_dir}/"))

    stored = server.query(f"SELECT id, name, name_1, code FROM {datasource} ORDER BY id")
    assert stored == [
        {"id": 1, "name": "a", "name_1": "b", "code": "007"},
        {"id": 3, "name": "c", "name_1": "d", "code": "9" * 5000},
        {"id": 7, "name": "two\r\nlines", "name_1": "g", "code": None},
        {"id": 8, "name": None, "name_1": None, "code": None},
    ]
    letters = sorted(d.element for d in dead_letters_in(dead_dir))
    assert summary.rows_read == 13 == summary.rows_acknowledged + summary.dead_letters
    assert summary.dead_letters == len(letters) == 9
    assert all(d.kind == "unencodable" for d in dead_letters_in(dead_dir))
    csv_path, header_path, broken_path = (tmp_path / name for name in (
        "rows.csv", "latin1-header.csv", "broken-header.csv"))
    expected = sorted([
        f"UnreadableRecord({broken_path} line 1: the header: ',' expected after '\"'; text='id,\"na\"me')",
        f"UnreadableRecord({broken_path} line 2: the header (line 1) could not be read; text='1,a')",
        f"UnreadableRecord({header_path} line 2: the header (line 1) is not UTF-8; text='1,2')",
        f"UnreadableRecord({header_path} line 3: the header (line 1) is not UTF-8; text='3,4')",
        f"UnreadableRecord({csv_path} line 5: not UTF-8 (the bytes that are not are shown as \\xNN); "
        "text='2,caf\\\\xe9,c,x')",
        f"UnreadableRecord({csv_path} line 8: ',' expected after '\"'; text='4,\"d\"x,e,y')",
        f"UnreadableRecord({csv_path} line 10: 5 values for 4 columns; text='6,e,f,g,h')",
        f"UnreadableRecord({csv_path} lines 14-16: unexpected end of data inside a quoted field never closed "
        "(3 lines read as this one record); text='9,\"never closed,h,i\\r\\n10,j,k,l\\r\\n11,m,n,o')",
    ])
    over_limit = [e for e in letters if " line 9: " in e]
    assert sorted(e for e in letters if e not in over_limit) == expected
    assert len(over_limit) == 1 and over_limit[0].startswith(
        f"UnreadableRecord({csv_path} line 9: field larger than field limit ({CSV_MAX_FIELD_CHARS}); "
        "text='5,\"xxxxxxxx")


def test_csv_unclosed_quote_holds_the_rest_of_the_file_and_says_how_many_lines(server, datasource, tmp_path):
    (tmp_path / "x.csv").write_bytes(b'id,name\n1,a\n2,"b\n3,c\n4,d\n5,e\n')
    dead_dir = tmp_path / "dead"

    summary, _ = run_quietly(run, sink_flags(
        server, datasource, "--input", str(tmp_path / "x.csv"), "--dead_letter_path", f"{dead_dir}/"))

    assert server.query(f"SELECT id, name FROM {datasource}") == [{"id": 1, "name": "a"}]
    assert (summary.rows_read, summary.rows_acknowledged, summary.dead_letters) == (2, 1, 1)
    (letter,) = dead_letters_in(dead_dir)
    assert "lines 3-6: unexpected end of data inside a quoted field never closed (4 lines" in letter.element
    assert letter.element.endswith("text='2,\"b\\n3,c\\n4,d\\n5,e')")


def test_csv_a_stray_quote_in_a_bad_row_does_not_take_the_rows_after_it(server, datasource, tmp_path):
    # A quote inside a field that did not start with one (12" pipe), or after the quote that
    # closed one, is a character to csv, not the start of a quoted field: a bad row holding an
    # odd number of them ends at its line end, as any other bad row. They were counted as opening
    # a quoted field, and the rows after it, up to the next odd count, were read as part of it.
    (tmp_path / "x.csv").write_bytes(
        b'id,name,size\n1,a,1\n2,"12" pipe",2\n3,c,3\n4,d,4\n5,5\'10" tall,"x"y\n6,e,6\n'
        b'7,"open ""quoted"" and\nclosed" x,7\n8,h,8\n')
    dead_dir = tmp_path / "dead"

    summary, _ = run_quietly(run, sink_flags(
        server, datasource, "--input", str(tmp_path / "x.csv"), "--dead_letter_path", f"{dead_dir}/"))

    assert [r["id"] for r in server.query(f"SELECT id FROM {datasource} ORDER BY id")] == [1, 3, 4, 6, 8]
    assert (summary.rows_read, summary.rows_acknowledged, summary.dead_letters) == (8, 5, 3)
    letters = sorted(d.element for d in dead_letters_in(dead_dir))
    assert letters == sorted([
        f"UnreadableRecord({tmp_path / 'x.csv'} line 3: ',' expected after '\"'; text='2,\"12\" pipe\",2')",
        f"UnreadableRecord({tmp_path / 'x.csv'} line 6: ',' expected after '\"'; text='5,5\\'10\" tall,\"x\"y')",
        f"UnreadableRecord({tmp_path / 'x.csv'} lines 8-9: ',' expected after '\"' (2 lines read as this one "
        "record); text='7,\"open \"\"quoted\"\" and\\nclosed\" x,7')",
    ])


def _sent_lines(server, datasource, tmp_path, path) -> list[str]:
    """What the sink sent for ``path``'s rows: the server refuses every request, so each is a dead letter's line."""
    server.set_faults([{"status": 400, "when": "before", "datasource": datasource, "message": "injected"}])
    dead_dir = tmp_path / f"dead-{path.name}"
    summary, _ = run_quietly(run, sink_flags(
        server, datasource, "--input", str(path), "--dead_letter_path", f"{dead_dir}/"))
    letters = dead_letters_in(dead_dir)
    assert summary.rows_read == summary.dead_letters == len(letters)
    assert all(d.kind == "rejected" for d in letters)
    return sorted(d.line for d in letters)


def test_numbers_go_out_as_written_from_json_arrays_and_csv(server, datasource, tmp_path):
    # As an NDJSON line is sent: wider than 64 bits, more digits than a double holds, out of its range.
    rows = ['{"id":1,"big":123456789012345678901234567890,"u64":18446744073709551615,'
            '"below":-9223372036854775809,"dec":0.1000000000000000055511151231257827,"money":12.50}',
            '{"id":2,"huge":1E+400,"tiny":1E-400,"nested":{"x":[0.30000000000000000001,2]}}']
    (tmp_path / "rows.json").write_text("[\n  " + ",\n  ".join(rows) + "\n]\n")
    assert _sent_lines(server, datasource, tmp_path, tmp_path / "rows.json") == sorted(rows)

    (tmp_path / "rows.csv").write_text(
        "id,dec,huge,tiny,money\n1,0.1000000000000000055511151231257827,1e999,1e-400,12.50\n")
    assert _sent_lines(server, datasource, tmp_path, tmp_path / "rows.csv") == [
        '{"id":1,"dec":0.1000000000000000055511151231257827,"huge":1E+999,"tiny":1E-400,"money":12.5}']


def test_json_not_a_number_lone_surrogate_and_classic_mac_line_ends(server, datasource, tmp_path):
    (tmp_path / "nan.json").write_text('[{"id": 1, "x": NaN}]')  # not JSON: not sent as null
    (tmp_path / "cr.json").write_bytes(b'{"id": 2}\r{"id": 3}\r')
    (tmp_path / "cr-whitespace.json").write_bytes(b'{"id":\r4}')  # one document, \r between tokens
    (tmp_path / "cr.ndjson").write_bytes(b'\xef\xbb\xbf{"id": 5}\r{"id": 6}\r\r')
    (tmp_path / "surrogate.json").write_text('[{"id": 7, "s": "\\ud800"}]')  # no text holds a lone surrogate
    dead_dir = tmp_path / "dead"

    json_run, _ = run_quietly(run, sink_flags(
        server, datasource, "--input", str(tmp_path / "*.json"), "--dead_letter_path", f"{dead_dir}/"))
    ndjson_run, _ = run_quietly(run, sink_flags(server, datasource, "--input", str(tmp_path / "cr.ndjson")))

    assert [r["id"] for r in server.query(f"SELECT id FROM {datasource} ORDER BY id")] == [2, 3, 4, 5, 6]
    assert (json_run.rows_read, json_run.rows_acknowledged, json_run.dead_letters) == (5, 3, 2)
    assert (ndjson_run.rows_read, ndjson_run.rows_acknowledged, ndjson_run.dead_letters) == (2, 2, 0)
    nan, surrogate = sorted(dead_letters_in(dead_dir), key=lambda d: "NaN" not in d.element)
    assert nan.kind == "unencodable" and nan.element.startswith(
        f"UnreadableRecord({tmp_path / 'nan.json'} item 1: NaN, Infinity and -Infinity are not JSON values; "
        "text=\"{'id': 1, 'x': NaN}\")")
    assert surrogate.kind == "unencodable" and surrogate.element.startswith(
        f"UnreadableRecord({tmp_path / 'surrogate.json'} item 1: a string holds a lone surrogate or bytes "
        "that are not UTF-8; text=\"{'id': 7, 's': '\\\\ud800'}\")")


def test_json_written_by_python_with_nan_refuses_only_the_items_holding_one(server, datasource, tmp_path):
    """Python's json.dump writes NaN and Infinity, which JSON has not: the whole array was read as
    JSON lines, every row of it a dead letter in pieces. Now the items holding one are refused, as
    NDJSON refuses such a line, and the others are stored."""
    rows = [{"id": i, "score": 0.5, "nested": {"values": [1, 2]}} for i in range(50)]
    rows[7]["score"] = float("nan")
    rows[31]["nested"]["values"].append(float("-inf"))
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=2))
    dead_dir = tmp_path / "dead"

    summary, _ = run_quietly(run, sink_flags(
        server, datasource, "--input", str(path), "--dead_letter_path", f"{dead_dir}/"))

    assert [r["id"] for r in server.query(f"SELECT id FROM {datasource} ORDER BY id")] == [
        i for i in range(50) if i not in (7, 31)]
    assert (summary.rows_read, summary.rows_acknowledged, summary.dead_letters) == (50, 48, 2)
    letters = sorted(d.element for d in dead_letters_in(dead_dir))
    assert [letter.split(": NaN, Infinity")[0] for letter in letters] == [
        f"UnreadableRecord({path} item 32", f"UnreadableRecord({path} item 8"]
    assert "'score': NaN" in letters[1] and "[1, 2, -Infinity]" in letters[0]


def test_json_an_escaped_emoji_beside_a_number_no_double_holds_is_read_as_one_document(server, datasource, tmp_path):
    # json.dumps and pandas escape an emoji as a surrogate pair. A document holding one was also
    # read by orjson, to refuse a lone surrogate, but orjson refuses 1E+400 too: the whole array
    # was then read as JSON lines, every row a dead letter in pieces ("  {", "    \"id\": 1,").
    path = tmp_path / "rows.json"
    path.write_text('[\n  {\n    "id": 1,\n    "msg": "ok \\ud83d\\ude00"\n  },\n'
                    '  {\n    "id": 2,\n    "huge": 1E+400\n  }\n]\n')
    assert _sent_lines(server, datasource, tmp_path, path) == ['{"id":1,"msg":"ok \U0001F600"}', '{"id":2,"huge":1E+400}']


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


# The same rows in every format: zip codes, with and without a leading zero, a number, a word, a
# decimal and nothing. A CSV field is text like a JSON string: each row goes where its text says.
_ZIPS = ("02134", "90210", "7", "true", "1.50", "")


def _write_zips(path, file_format: str) -> None:
    rows = [{"id": i, "zip": zip_code} for i, zip_code in enumerate(_ZIPS)]
    if file_format == "csv":
        path.write_text("id,zip\n" + "".join(f"{row['id']},{row['zip']}\n" for row in rows), encoding="utf-8")
    elif file_format == "ndjson":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif file_format == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif file_format == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "wb") as fh:
            fastavro.writer(fh, fastavro.parse_schema({"type": "record", "name": "Zip", "fields": [
                {"name": "id", "type": "long"}, {"name": "zip", "type": "string"}]}), rows)


@pytest.mark.parametrize("file_format", _formats.FORMATS)
def test_datasource_field_routes_a_rows_text_alike_from_every_format(server, datasource, tmp_path, file_format):
    """A prefix makes "90210", "7" and "true" names: a CSV row goes where a JSON row with that text goes
    (CSV's typing turned them into an int and a bool, which name nothing); "1.50" and "" name none."""
    _write_zips(tmp_path / f"zips.{file_format}", file_format)
    prefix = f"{datasource}_{file_format}_"
    dead_dir = tmp_path / "dead"

    summary, _ = run_quietly(run, [
        "--api_url", server.url, "--token", server.token, "--wait", "--num_shards", "2",
        "--datasource_field", "zip", "--datasource_prefix", prefix, "--max_dead_letter_ratio", "1",
        "--input", str(tmp_path / f"zips.{file_format}"), "--dead_letter_path", f"{dead_dir}/"])

    server.flush()
    for i, zip_code in enumerate(_ZIPS[:4]):
        assert server.query(f"SELECT id, zip FROM {prefix}{zip_code}") == [{"id": i, "zip": zip_code}]
    assert (summary.rows_read, summary.rows_acknowledged) == (6, 4)
    assert summary.dead_letters_by_kind == {"unroutable": 2}
    assert {name: f.rows_acknowledged for name, f in summary.by_datasource.items() if f.rows_acknowledged} == {
        f"{prefix}{zip_code}": 1 for zip_code in _ZIPS[:4]}
    letters = sorted(dead_letters_in(dead_dir), key=lambda d: json.loads(d.line)["id"])
    assert [(json.loads(d.line)["id"], d.kind, d.datasource) for d in letters] == [
        (4, "unroutable", f"{prefix}1.50"), (5, "unroutable", "")]
    assert letters[0].message.startswith("the datasource function's result must match [A-Za-z_]")
    # CSV reads an empty field as null (JSON's missing value); the other formats hold "".
    assert letters[1].message == ("the datasource function raised TypeError: field 'zip' holds NoneType None, not a str"
                                  if file_format == "csv" else
                                  "the datasource function raised ValueError: field 'zip' is empty: it names no data "
                                  "source")


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


_BAD_ITEMS = [  # (an item's JSON text, as bytes, that no JSON text sent can hold, the reason given)
    (b'{"id": 2, "x": NaN}', "NaN, Infinity and -Infinity are not JSON values"),
    (b'{"id": 2, "x": [1, -Infinity]}', "NaN, Infinity and -Infinity are not JSON values"),
    (b'{"id": 2, "s": "\\ud800"}', "a string holds a lone surrogate or bytes that are not UTF-8"),
    (b'{"id": 2, "\\udfff": 1}', "a string holds a lone surrogate or bytes that are not UTF-8"),
    (b'{"id": 2, "s": "caf\xe9"}', "a string holds a lone surrogate or bytes that are not UTF-8"),
    (b'{"id": 2, "n": {"deep": ' + b"9" * 5000 + b"}}", "an integer of more than 4,300 digits"),
]


@pytest.mark.parametrize("pretty", [False, True], ids=["one-line", "indented"])
@pytest.mark.parametrize("bad, reason", _BAD_ITEMS, ids=["nan", "infinity", "lone-surrogate", "surrogate-key",
                                                         "latin-1-byte", "huge-integer"])
def test_json_an_array_refuses_only_the_item_no_json_text_can_hold(tmp_path, bad, reason, pretty):
    """One bad item (a lone surrogate escape, bytes that are not UTF-8, an integer Python will not read)
    made the whole array be read as JSON lines, every line of it a dead letter in pieces; now that item
    alone is refused, with its whole text, and the others are read."""
    from apache_beam.io import fileio
    from apache_beam.io.filesystem import FileMetadata

    separator = b",\n  " if pretty else b", "
    path = tmp_path / "rows.json"
    path.write_bytes(b"[" + separator.join([b'{"id": 1}', bad, b'{"id": 3, "ok": "\\ud83d\\ude00"}']) + b"]")
    readable = fileio.ReadableFile(FileMetadata(str(path), path.stat().st_size))
    records = list(_formats._JsonDocumentDoFn().process(readable))

    assert [type(record).__name__ for record in records] == ["dict", "UnreadableRecord", "dict"]
    assert records[0] == {"id": 1} and records[2] == {"id": 3, "ok": "\U0001F600"}
    refused = records[1]
    assert (refused.path, refused.position, refused.reason) == (str(path), "item 2", reason)
    assert "'id': 2" in refused.text and len(refused.text) > len(bad) // 2  # the whole item, not a piece


def test_an_item_nested_deeper_than_python_recurses_is_refused():
    deep: list = [_formats._constant("NaN")]
    for _ in range(5000):
        deep = [deep]
    assert _formats._refusal(deep) == "nested deeper than this reader can check"
    assert _formats._refusal([[1, {"a": [2]}]]) is None
