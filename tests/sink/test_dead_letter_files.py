"""Dead-letter files of unbounded input: one final file per pane of grouped dead letters, never a
temporary file left behind."""

from __future__ import annotations

import gzip
import io
import json
import os

import apache_beam as beam
import fastavro
import orjson
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from shared_testlib import dead_letters_in

from sinks.tinybird.dead_letters import (
    AVRO_SCHEMA,
    STREAMING_FILE_EVERY_SECS,
    STREAMING_FILE_KEYS,
    DeadLetter,
    ReadDeadLetters,
    WriteDeadLetterFiles,
    _WritePaneFileDoFn,
    line_text,
    streaming_file_name,
    to_json_line,
    utf8_text,
)


def _letter(i: int) -> DeadLetter:
    return DeadLetter(line=None, element=f"b'bad {i}'", datasource="events", kind="unencodable", status=None,
                      message="invalid JSON", attempts=0, first_attempt_at="2026-12-01T00:00:00.000Z",
                      last_attempt_at="2026-12-01T00:00:00.000Z", window="global")


@pytest.mark.parametrize("file_format", ["json", "avro"])
def test_a_pane_writes_one_final_file_and_no_temporary_one(tmp_path, file_format):
    writer = _WritePaneFileDoFn(path=str(tmp_path) + "/", file_format=file_format, clock=lambda: 1_796_000_000.25)
    writer.setup()
    [result] = list(writer.process((0, [_letter(i) for i in range(3)])))
    [name] = os.listdir(tmp_path)
    assert result.file_name == str(tmp_path / name)
    suffix = ".jsonl" if file_format == "json" else ".avro"
    # dead-letters-<UTC time of writing, to the millisecond>-<12 random hex digits><suffix>
    assert name.startswith("dead-letters-2026-11-30T005320250Z-") and name.endswith(suffix)
    assert len(name) == len("dead-letters-2026-11-30T005320250Z-") + 12 + len(suffix)
    with open(tmp_path / name, "rb") as fh:
        records = list(fastavro.reader(fh)) if file_format == "avro" else [orjson.loads(line) for line in fh]
    assert [DeadLetter(**r) for r in records] == [_letter(i) for i in range(3)]


def test_a_pane_that_fails_while_written_leaves_no_file_behind(tmp_path):
    """The runner retries the failed bundle (which writes the pane to a new file)."""

    def records():
        yield _letter(1)
        raise OSError("the disk is full")

    writer = _WritePaneFileDoFn(path=str(tmp_path), file_format="json")
    writer.setup()
    with pytest.raises(OSError, match="the disk is full"):
        list(writer.process((0, records())))
    assert os.listdir(tmp_path) == []
    # An empty pane (the last one may be) writes nothing.
    assert list(writer.process((0, []))) == []
    assert os.listdir(tmp_path) == []


def _with_surrogates(i: int) -> DeadLetter:
    """A record as a user's code can make one (the sink's own are escaped when made)."""
    return _letter(i)._replace(element=f"{{'name\udcff': {i}}}", datasource="ev_\udcff",
                               message="Type is not JSON serializable: object (at $.name\udcff)")


def _escaped(i: int) -> DeadLetter:
    return _letter(i)._replace(element=f"{{'name\\udcff': {i}}}", datasource="ev_\\udcff",
                               message="Type is not JSON serializable: object (at $.name\\udcff)")


@pytest.mark.parametrize("file_format", ["json", "avro"])
def test_a_record_holding_a_lone_surrogate_is_written_escaped_with_the_others(tmp_path, file_format):
    writer = _WritePaneFileDoFn(path=str(tmp_path) + "/", file_format=file_format)
    writer.setup()
    records = [_letter(0), _with_surrogates(1), _letter(2)]
    [result] = list(writer.process((0, records)))
    with open(result.file_name, "rb") as fh:
        written = list(fastavro.reader(fh)) if file_format == "avro" else [orjson.loads(line) for line in fh]
    assert [DeadLetter(**r) for r in written] == [_letter(0), _escaped(1), _letter(2)]


@pytest.mark.parametrize("file_format", ["json", "avro"])
def test_bounded_dead_letter_files_hold_every_record_escaped_and_read_back(tmp_path, file_format):
    records = [_with_surrogates(i) if i % 2 else _letter(i) for i in range(10)]
    with beam.Pipeline(runner=FnApiRunner()) as p:
        # Made in the pipeline, next to the writer: a lone surrogate crosses no Beam coder.
        _ = (p | beam.Create(list(range(10)), reshuffle=False)
             | beam.Map(lambda i: _with_surrogates(i) if i % 2 else _letter(i)).with_output_types(DeadLetter)
             | WriteDeadLetterFiles(str(tmp_path / "out") + "/", file_format=file_format))
    with beam.Pipeline(runner=FnApiRunner()) as p:
        read = p | ReadDeadLetters(str(tmp_path / "out" / "*"))
        assert_that(read, equal_to([_escaped(i) if i % 2 else _letter(i) for i in range(10)]))
    assert all("\udcff" in r.datasource for r in records[1::2])  # what went in did hold them


def test_a_temporary_file_left_by_a_killed_writer_is_not_read_back(tmp_path):
    """A worker killed between closing a pane's file and renaming it leaves its ``.in-progress-`` file;
    the retried bundle writes the same records to a final file. ``dead-letters/*`` (as the READMEs
    write it) matches both: reading the temporary one would replay every record twice."""
    records = [_letter(i) for i in range(3)]
    writer = _WritePaneFileDoFn(path=str(tmp_path) + "/", file_format="json")
    writer.setup()
    [result] = list(writer.process((0, records)))
    final = os.path.basename(result.file_name)
    (tmp_path / f".in-progress-{final}").write_bytes((tmp_path / final).read_bytes())
    with beam.Pipeline(runner=FnApiRunner()) as p:
        assert_that(p | ReadDeadLetters(str(tmp_path / "*")), equal_to(records))


def _read_back(pattern: str, tmp_path) -> list[DeadLetter]:
    """What ``ReadDeadLetters`` reads, in the order of the files and of their records."""
    out = tmp_path / "read-back"
    with beam.Pipeline(runner=FnApiRunner()) as p:
        (p | ReadDeadLetters(pattern) | beam.Map(lambda r: orjson.dumps(r._asdict()).decode())
           | beam.io.WriteToText(str(out), shard_name_template=""))
    return [DeadLetter(**orjson.loads(line)) for line in out.read_text().splitlines()]


def test_an_avro_file_cut_short_gives_its_whole_records_then_says_where_it_stops(tmp_path):
    """Copied while written, or from a full disk: the records before the cut are replayed, and the
    rest is one record saying so, not a failure of a replay that has posted those already."""
    records = [_letter(i) for i in range(300)]
    whole = tmp_path / "whole.avro"
    with open(whole, "wb") as fh:
        fastavro.writer(fh, AVRO_SCHEMA, [r._asdict() for r in records], codec="deflate", sync_interval=2000)
    data = whole.read_bytes()
    (tmp_path / "in").mkdir()
    cut = tmp_path / "in" / "dead-letters-cut.avro"
    cut.write_bytes(data[: len(data) * 2 // 3])

    found = _read_back(str(tmp_path / "in" / "*"), tmp_path)

    *read, last = found
    assert 0 < len(read) < len(records) and read == records[: len(read)]
    assert (last.kind, last.line, last.element, last.datasource) == ("unencodable", None, None, "")
    assert last.message.startswith(f"{cut} cannot be read after its record {len(read)} (a file cut short?): ")


def test_json_lines_compressed_since_or_saved_with_a_byte_order_mark_read_back(tmp_path):
    records = [_letter(i) for i in range(5)]
    text = b"".join(orjson.dumps(r._asdict()) + b"\n" for r in records)
    (tmp_path / "dead-letters-a.jsonl.gz").write_bytes(gzip.compress(text))
    (tmp_path / "dead-letters-b.jsonl").write_bytes(b"\xef\xbb\xbf" + text)
    avro = io.BytesIO()
    fastavro.writer(avro, AVRO_SCHEMA, [r._asdict() for r in records])
    (tmp_path / "dead-letters-c.avro.gz").write_bytes(gzip.compress(avro.getvalue()))

    (tmp_path / "in").mkdir()
    for name in ("dead-letters-a.jsonl.gz", "dead-letters-b.jsonl", "dead-letters-c.avro.gz"):
        (tmp_path / name).rename(tmp_path / "in" / name)
    assert sorted(_read_back(str(tmp_path / "in" / "*"), tmp_path)) == sorted(records * 3)


def test_text_is_escaped_only_where_it_cannot_be_written_as_utf8():
    assert utf8_text("caf\u00e9 \U0001f600") == "caf\u00e9 \U0001f600"
    assert utf8_text("a\udcffb\ud800") == "a\\udcffb\\ud800"
    assert utf8_text("plain") == "plain"
    assert line_text(b'{"s":"caf\xc3\xa9"}') == '{"s":"caf\u00e9"}'
    assert line_text(b'{"s":"\xff"}') == '{"s":"\\xff"}'
    assert orjson.loads(to_json_line(_with_surrogates(1))) == _escaped(1)._asdict()
    assert to_json_line(_letter(1)) == orjson.dumps(_letter(1)._asdict()) + b"\n"


def _streaming() -> PipelineOptions:
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    return options


def test_streaming_dead_letters_of_many_bundles_share_a_file_per_key_and_period(tmp_path):
    """Issue 21, 6: one file per pane, not per bundle. Six minutes at 1% bad rows, simulated: a bundle
    of 100 rows (one bad) every second of processing time, each bundle a TestStream step."""
    bundles = 360
    stream = TestStream().advance_watermark_to(0)
    for i in range(bundles):
        stream = stream.add_elements([TimestampedValue(_letter(i), i)]).advance_processing_time(1)
    stream = stream.advance_watermark_to_infinity()
    with TestPipeline(options=_streaming()) as p:
        results = p | stream | WriteDeadLetterFiles(str(tmp_path) + "/")
        assert_that(results | beam.Map(lambda result: os.path.basename(result.file_name)),
                    lambda found: _all_final(found, tmp_path))
    names = sorted(os.listdir(tmp_path))
    written = [json.loads(line)["element"] for n in names for line in (tmp_path / n).read_text().splitlines()]
    assert sorted(written) == sorted(f"b'bad {i}'" for i in range(bundles))
    # At most one file per key per period (and one last pane per key at the end), not one per bundle.
    assert len(names) <= STREAMING_FILE_KEYS * (bundles / STREAMING_FILE_EVERY_SECS + 1), len(names)


def _all_final(found, tmp_path) -> None:
    assert sorted(found) == sorted(os.listdir(tmp_path)) and all(n.startswith("dead-letters-") for n in found)


def test_file_names_sort_by_time_and_never_repeat():
    names = {streaming_file_name(1_796_000_000.0, ".jsonl") for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith("dead-letters-2026-11-30T005320000Z-") for n in names)
    assert streaming_file_name(1_796_000_000.0, ".avro") < streaming_file_name(1_796_000_001.0, ".avro")


def test_a_label_goes_into_every_file_name_bounded_and_streaming(tmp_path):
    assert streaming_file_name(1_796_000_000.0, ".jsonl", "run-7").startswith("dead-letters-run-7-2026-11-30T005320000Z-")
    letters = [_letter(i) for i in range(40)]
    with TestPipeline(runner="FnApiRunner") as p:
        _ = p | beam.Create(letters) | WriteDeadLetterFiles(str(tmp_path / "dl"), label="20261207T081502Z-3fa9c1")
    names = [n for n in os.listdir(tmp_path / "dl") if not n.startswith(".temp")]  # Beam's own temporary folder
    assert names and all(n.startswith("dead-letters-20261207T081502Z-3fa9c1-pane0-") for n in names)
    assert sorted(dead_letters_in(tmp_path / "dl"), key=repr) == sorted(letters, key=repr)


def test_the_path_and_format_are_checked():
    with pytest.raises(ValueError, match="dead_letter_format"):
        WriteDeadLetterFiles("dlq/", file_format="csv")
    with pytest.raises(ValueError, match="dead_letter_path"):
        WriteDeadLetterFiles(" ")
