"""Files written by real tools (pandas, pyarrow, fastavro) through ``pipelines.files_to_tinybird``.

pandas is installed here as on Beam's worker images, so pyarrow hands out
``pd.Timestamp`` for ``timestamp[ns]`` columns and ``pd.Timedelta`` for
durations, as it does on Dataflow. Each file goes through the whole job against
the local server; every row must be stored, with no dead letter, and the stored
values are checked, not only the counts.
"""

from __future__ import annotations

import datetime
import decimal
import tracemalloc
import uuid

import apache_beam as beam
import fastavro
import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.parquetio import _ArrowTableToRowDictionaries
from pipelines_testlib import count, run_quietly, sink_flags
from shared_testlib import dead_letters_in

from pipelines._formats import PARQUET_ROWS_PER_SLICE, ReadRecords, _TableRowsDoFn
from pipelines.files_to_tinybird import run

pytestmark = pytest.mark.timeout(180)

ROWS = 300
UTC = datetime.UTC


def _listed(value):
    """An array column as a list (the local server answers arrays as lists or as JSON text)."""
    return value if isinstance(value, list) else orjson.loads(value)


def _run_and_check_every_row_stored(server, datasource, tmp_path, pattern: str) -> list[dict]:
    """Runs the files job on ``pattern``; checks every row stored and nothing dead; returns the rows by id."""
    dead_dir = tmp_path / "dead"
    summary, _ = run_quietly(run, sink_flags(
        server, datasource, "--input", pattern, "--dead_letter_path", f"{dead_dir}/"))
    assert summary.rows_read == ROWS
    assert summary.dead_letters == 0 and dead_letters_in(dead_dir) == []
    assert summary.rows_quarantined == 0 and count(server, f"{datasource}_quarantine") == 0
    assert summary.rows_stored == ROWS == count(server, datasource)
    rows = server.query(f"SELECT * FROM {datasource} ORDER BY id")
    assert [row["id"] for row in rows] == list(range(ROWS))
    return rows


def _column_types(server, datasource: str) -> dict[str, str]:
    return {c["name"]: c["type"] for c in server.datasources()[datasource]["columns"]}


def _pandas_frame() -> pd.DataFrame:
    """300 rows with what pandas users put in a frame; row 1 holds the missing values."""
    base = pd.Timestamp("2024-05-01 08:00:00.123456789")
    at = pd.Series([base + pd.Timedelta(seconds=i) for i in range(ROWS)], dtype="datetime64[ns]")
    at[1] = pd.NaT
    counts = pd.array([i * 10 for i in range(ROWS)], dtype="Int64")
    counts[1] = pd.NA
    scores = pd.Series([i / 4 for i in range(ROWS)], dtype="float64")
    scores[1] = np.nan
    return pd.DataFrame({
        "id": pd.Series(range(ROWS), dtype="int64"),
        "at": at,
        "at_madrid": (at.fillna(base) + pd.Timedelta(hours=2)).dt.tz_localize("UTC").dt.tz_convert("Europe/Madrid"),
        "count": counts,
        "score": scores,
        "waited": pd.Series([pd.Timedelta(milliseconds=1500 * i) for i in range(ROWS)], dtype="timedelta64[ns]"),
        "country": pd.Categorical(["ES" if i % 3 else "GB" for i in range(ROWS)]),
        "price": [decimal.Decimal(f"{i}.05") for i in range(ROWS)],
        "skus": [[f"sku-{i}", f"sku-{i + 1}"] if i % 2 else [] for i in range(ROWS)],
        "premium": [i % 2 == 0 for i in range(ROWS)],
        "note": [None if i % 5 == 0 else f'say "hi", {i}\nthen go' for i in range(ROWS)],
    })


def test_parquet_written_by_pandas_every_row_stored_with_its_values(server, datasource, tmp_path):
    frame = _pandas_frame()
    frame.to_parquet(tmp_path / "events.parquet")
    # What the file holds, as Beam's reader will see it: nanosecond timestamps, one with a zone.
    schema = pq.read_schema(tmp_path / "events.parquet")
    assert str(schema.field("at").type) == "timestamp[ns]"
    assert str(schema.field("at_madrid").type) == "timestamp[ns, tz=Europe/Madrid]"
    assert str(schema.field("country").type) == "dictionary<values=string, indices=int8, ordered=0>"
    assert str(schema.field("price").type) == "decimal128(5, 2)"

    rows = _run_and_check_every_row_stored(server, datasource, tmp_path, str(tmp_path / "*.parquet"))

    types = _column_types(server, datasource)
    assert types["at"] == "Nullable(DateTime64)" and types["at_madrid"] == "DateTime64"
    assert types["waited"] == "Float64" and types["count"] == "Nullable(Int64)"
    # The local server keeps DateTime64 to the millisecond (as Tinybird's default DateTime64(3)).
    assert [r["at"] for r in rows[:4]] == [
        "2024-05-01 08:00:00.123", None, "2024-05-01 08:00:02.123", "2024-05-01 08:00:03.123"]
    # Europe/Madrid converted to UTC.
    assert rows[2]["at_madrid"] == "2024-05-01 10:00:02.123"
    assert [r["count"] for r in rows[:3]] == [0, None, 20]
    assert [r["score"] for r in rows[:3]] == [0.0, None, 0.5]
    assert [r["waited"] for r in rows[:3]] == [0.0, 1.5, 3.0]  # durations: seconds
    assert [r["country"] for r in rows[:4]] == ["GB", "ES", "ES", "GB"]
    assert [r["price"] for r in rows[:3]] == [0.05, 1.05, 2.05]
    assert [_listed(r["skus"]) for r in rows[:3]] == [[], ["sku-1", "sku-2"], []]
    assert [r["premium"] for r in rows[:2]] == [True, False]
    assert [r["note"] for r in rows[:2]] == [None, 'say "hi", 1\nthen go']
    assert all(r["at"] is not None for r in rows if r["id"] != 1)


# snappy: Spark's default codec for Avro files (fastavro reads it with cramjam, a dependency for this).
def _every_arrow_type(rows: int) -> pa.Table:
    """A table of every kind of column a Parquet file written by pandas, pyarrow or Spark holds."""
    at = datetime.datetime(2024, 5, 1, 8, 0, 0, 123456)
    return pa.table({
        "int8": pa.array([i % 100 - 50 for i in range(rows)], pa.int8()),
        "uint64": pa.array([2**64 - 1 - i for i in range(rows)], pa.uint64()),
        "float32": pa.array([i / 3 for i in range(rows)], pa.float32()),
        "float64": pa.array([float("nan") if i % 7 == 0 else i / 3 for i in range(rows)]),
        "text": pa.array([None if i % 5 == 0 else f"é {i}" for i in range(rows)]),
        "large_text": pa.array([f"t{i}" for i in range(rows)], pa.large_string()),
        "binary": pa.array([bytes([i % 256]) * 3 for i in range(rows)], pa.binary()),
        "bool": pa.array([i % 3 == 0 for i in range(rows)]),
        "ts_ns": pa.array([at + datetime.timedelta(seconds=i) for i in range(rows)], pa.timestamp("ns")),
        "ts_tz": pa.array([at + datetime.timedelta(seconds=i) for i in range(rows)], pa.timestamp("us", tz="Europe/Madrid")),
        "date": pa.array([datetime.date(2024, 1, 1) + datetime.timedelta(days=i % 400) for i in range(rows)]),
        "time": pa.array([datetime.time(i % 24, 30) for i in range(rows)], pa.time64("us")),
        "decimal": pa.array([decimal.Decimal(i) / 100 for i in range(rows)], pa.decimal128(12, 2)),
        "dictionary": pa.array([["ES", "MX", "AR"][i % 3] for i in range(rows)]).dictionary_encode(),
        "list": pa.array([list(range(i % 4)) for i in range(rows)]),
        "struct": pa.array([{"a": i, "b": None if i % 2 else str(i)} for i in range(rows)]),
        "map": pa.array([[("k", i)] for i in range(rows)], pa.map_(pa.string(), pa.int64())),
        "null": pa.nulls(rows),
    })


def test_parquet_rows_are_the_values_beams_reader_gives_a_slice_at_a_time():
    """The files job makes a Parquet row group's rows a slice at a time (Beam's own step makes the
    whole row group Python objects at once): the same rows, every value equal and of the same type."""
    table = _every_arrow_type(2 * PARQUET_ROWS_PER_SLICE + 7)
    ours = list(_TableRowsDoFn().process(table))
    beams = list(_ArrowTableToRowDictionaries().process(table))
    assert len(ours) == len(beams) == table.num_rows
    for mine, theirs in zip(ours, beams, strict=True):
        assert list(mine) == list(theirs)
        for name in mine:
            a, b = mine[name], theirs[name]
            assert type(a) is type(b), name
            assert a == b or (a != a and b != b), (name, a, b)  # NaN is itself


def test_a_parquet_row_group_is_made_python_objects_a_slice_at_a_time():
    """A row group of 100,000 rows: the Python objects alive at once while its rows are taken one
    by one are those of a slice, not the row group's (Beam's step: every row at once)."""
    rows = 100_000
    at = datetime.datetime(2024, 5, 1)
    table = pa.table({
        "id": pa.array(range(rows), pa.int64()), "value": pa.array([i / 3 for i in range(rows)]),
        "text": pa.array([f"t{i % 1000}" for i in range(rows)]), "bool": pa.array([i % 2 == 0 for i in range(rows)]),
        "at": pa.array([at + datetime.timedelta(seconds=i) for i in range(rows)], pa.timestamp("us")),
    })

    def peak_bytes(do_fn) -> int:
        tracemalloc.start()
        try:
            rows = sum(1 for _ in do_fn.process(table))
            return tracemalloc.get_traced_memory()[1] if rows == table.num_rows else -1
        finally:
            tracemalloc.stop()

    ours, beams = peak_bytes(_TableRowsDoFn()), peak_bytes(_ArrowTableToRowDictionaries())
    assert 0 < ours < 2 * 2**20, ours  # a slice of 1,024 rows, and the iteration's own
    assert beams > 10 * ours, (beams, ours)  # what the bound is against (about 19 MB here)
    # And it is what the files job reads Parquet rows with (its first steps, as built for a run).
    pipeline = beam.Pipeline()
    _ = pipeline | "Read" >> ReadRecords("/nowhere/*.parquet", file_format="parquet")
    do_fns = [type(node.transform.dofn) for node in _applied(pipeline) if isinstance(node.transform, beam.ParDo)]
    assert _TableRowsDoFn in do_fns and _ArrowTableToRowDictionaries not in do_fns, do_fns


def _applied(pipeline: beam.Pipeline) -> list:
    nodes, stack = [], [pipeline._root_transform()]  # pylint: disable=protected-access
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.parts)
    return nodes


@pytest.mark.parametrize("codec", ["null", "deflate", "snappy"])
def test_avro_written_by_fastavro_with_logical_types(server, datasource, tmp_path, codec):
    schema = fastavro.parse_schema({
        "type": "record", "name": "Order", "fields": [
            {"name": "id", "type": "long"},
            {"name": "at_millis", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "at_micros", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "day", "type": {"type": "int", "logicalType": "date"}},
            {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 3}},
            {"name": "order_id", "type": {"type": "string", "logicalType": "uuid"}},
            {"name": "coupon", "type": ["null", "string"], "default": None},
        ]})
    start = datetime.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    records = [{
        "id": i,
        "at_millis": start + datetime.timedelta(seconds=i),
        "at_micros": start + datetime.timedelta(microseconds=i),
        "day": datetime.date(2024, 5, 1) + datetime.timedelta(days=i % 31),
        "amount": decimal.Decimal(f"{i}.125"),
        "order_id": uuid.UUID(int=i),
        "coupon": None if i % 2 else f"C{i}",
    } for i in range(ROWS)]
    with open(tmp_path / "orders.avro", "wb") as fh:
        fastavro.writer(fh, schema, records, codec=codec)
    with open(tmp_path / "orders.avro", "rb") as fh:
        assert fastavro.reader(fh).codec == codec

    rows = _run_and_check_every_row_stored(server, datasource, tmp_path, str(tmp_path / "orders.avro"))

    types = _column_types(server, datasource)
    assert (types["at_millis"], types["at_micros"], types["day"]) == ("DateTime64", "DateTime64", "Date")
    assert rows[1]["at_millis"] == "2024-05-01 12:00:01.123"  # millis: .123456 was cut by the writer
    assert rows[7]["at_micros"] == "2024-05-01 12:00:00.123"
    assert [r["day"] for r in rows[:2]] == ["2024-05-01", "2024-05-02"] and rows[31]["day"] == "2024-05-01"
    assert [r["amount"] for r in rows[:3]] == [0.125, 1.125, 2.125]
    assert rows[5]["order_id"] == "00000000-0000-0000-0000-000000000005"
    assert [r["coupon"] for r in rows[:3]] == ["C0", None, "C2"]


def test_csv_written_by_pandas(server, datasource, tmp_path):
    frame = _pandas_frame().drop(columns=["skus"])  # CSV has no lists
    frame.to_csv(tmp_path / "events.csv", index=False)

    rows = _run_and_check_every_row_stored(server, datasource, tmp_path, str(tmp_path / "events.csv"))

    types = _column_types(server, datasource)
    assert types["count"] == "Nullable(Int64)" and types["score"] == "Nullable(Float64)"
    assert types["premium"] == "Bool" and types["at"] == "Nullable(DateTime64)"
    # pandas writes "2024-05-01 08:00:00.123456789" and "2024-05-01 10:00:00.123456789+02:00".
    assert [r["at"] for r in rows[:3]] == ["2024-05-01 08:00:00.123", None, "2024-05-01 08:00:02.123"]
    assert rows[2]["at_madrid"] == "2024-05-01 10:00:02.123"
    assert [r["count"] for r in rows[:3]] == [0, None, 20]
    assert [r["score"] for r in rows[:3]] == [0.0, None, 0.5]
    assert rows[3]["waited"] == "0 days 00:00:04.500000"  # pandas' own text: CSV has no types
    assert [r["country"] for r in rows[:2]] == ["GB", "ES"]
    assert [r["price"] for r in rows[:2]] == [0.05, 1.05]
    assert [r["premium"] for r in rows[:2]] == [True, False]
    assert [r["note"] for r in rows[:2]] == [None, 'say "hi", 1\nthen go']


def _text_frame() -> pd.DataFrame:
    """300 rows of what every text format holds; text with quotes, commas, line ends and accents; row 1 has a missing count."""
    return pd.DataFrame({
        "id": pd.Series(range(ROWS), dtype="int64"),
        "name": [f'café "{i}", then\nmore' for i in range(ROWS)],
        "amount": [i / 4 for i in range(ROWS)],
        "count": pd.array([None if i == 1 else i * 10 for i in range(ROWS)], dtype="Int64"),
        "premium": [i % 2 == 0 for i in range(ROWS)],
    })


PANDAS_TEXT_WRITERS = {
    "csv": lambda frame, path, compression: frame.to_csv(path, index=False, compression=compression),
    "ndjson": lambda frame, path, compression: frame.to_json(
        path, orient="records", lines=True, compression=compression),
    "json": lambda frame, path, compression: frame.to_json(path, orient="records", compression=compression),
}


@pytest.mark.parametrize("compression, suffix", [("gzip", ".gz"), ("bz2", ".bz2"), ("zstd", ".zst"), ("xz", ".xz")])
@pytest.mark.parametrize("file_format", sorted(PANDAS_TEXT_WRITERS))
def test_compressed_csv_ndjson_and_json_written_by_pandas(server, datasource, tmp_path, file_format, compression,
                                                          suffix):
    path = tmp_path / f"events.{file_format}{suffix}"
    PANDAS_TEXT_WRITERS[file_format](_text_frame(), path, compression)

    rows = _run_and_check_every_row_stored(server, datasource, tmp_path, str(path))

    assert [r["name"] for r in rows[:2]] == ['café "0", then\nmore', 'café "1", then\nmore']
    assert [r["amount"] for r in rows[:3]] == [0.0, 0.25, 0.5]
    assert [r["count"] for r in rows[:3]] == [0, None, 20]
    assert [r["premium"] for r in rows[:2]] == [True, False]
    assert rows[-1] == {"id": 299, "name": 'café "299", then\nmore', "amount": 74.75, "count": 2990,
                        "premium": False}
