"""The pipelines' shared pieces: options, validated config, token hygiene, progress, summary, formats."""

from __future__ import annotations

import dataclasses
import decimal
import logging
import os
import pickle
import random

import apache_beam as beam
import fastavro
import orjson
import pytest
from apache_beam.coders import BytesCoder
from apache_beam.io import textio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.range_trackers import OffsetRangeTracker
from apache_beam.io.restriction_trackers import OffsetRange
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines import files_to_tinybird, replay_dead_letters, streaming_to_tinybird
from pipelines._endpoint import Endpoint
from pipelines._formats import (
    UnreadableRecord,
    _lines_starting_in,
    binary_safe_record,
    compression_suffix,
    csv_value,
    format_from_path,
)
from pipelines._options import SinkConfig, UsageError, beam_options_without_secrets, parse_bool
from pipelines._progress import CountRowsDoFn
from pipelines._summary import DatasourceFigures, RunSummary, display_path, format_summary, judge
from sinks.tinybird._encoding import element_repr, encode_element
from sinks.tinybird.dead_letters import AVRO_SCHEMA, DeadLetter, to_json_line

_OPTION_CLASSES = [
    files_to_tinybird.FilesToTinybirdOptions,
    streaming_to_tinybird.StreamingToTinybirdOptions,
    replay_dead_letters.ReplayDeadLettersOptions,
]


def test_all_pipelines_options_live_together_in_one_process():
    # Beam parses every PipelineOptions subclass of the process with one parser
    # (get_all_options, used when a job is submitted): shared names must not conflict.
    options = PipelineOptions(["--datasource", "events", "--input", "x/*", "--window_secs", "5"])
    values = options.get_all_options()
    assert values["datasource"] == "events" and values["input"] == "x/*" and values["window_secs"] == 5


@pytest.mark.parametrize("options_class", _OPTION_CLASSES)
def test_defaults_without_api_url_use_the_embedded_server(options_class):
    config = SinkConfig.from_options(options_class([]))
    assert config.embedded and config.datasource == "events"
    assert config.wait is True  # exact quarantine counts in the local summary
    assert (config.compression, config.dead_letter_format, config.token_env) == ("zstd", "json", "TINYBIRD_TOKEN")
    assert (config.max_batch_bytes, config.max_batch_rows, config.num_shards) == (8 * 1024 * 1024, 200_000, 8)
    assert config.max_windows_per_bundle == 20


def test_options_as_a_command_line_and_as_flex_template_parameters():
    argv = ["--api_url=https://api.us-east.aws.tinybird.co", "--datasource=web_events", "--wait=false",
            "--compression=none", "--max_batch_bytes=1048576", "--max_batch_rows=5000", "--num_shards=3",
            "--max_windows_per_bundle=5", "--dead_letter_path=gs://b/dl/", "--dead_letter_format=avro",
            "--token_secret=projects/p/secrets/tb/versions/latest"]
    config = SinkConfig.from_options(files_to_tinybird.FilesToTinybirdOptions(argv))
    assert config == SinkConfig(
        datasource="web_events", api_url="https://api.us-east.aws.tinybird.co", wait=False, compression=None,
        max_batch_bytes=1048576, max_batch_rows=5000, num_shards=3, max_windows_per_bundle=5,
        dead_letter_path="gs://b/dl/",
        dead_letter_format="avro", token_secret="projects/p/secrets/tb/versions/latest")
    assert SinkConfig.from_options(files_to_tinybird.FilesToTinybirdOptions(
        ["--api_url", "https://x.tinybird.co", "--datasource", "d", "--wait"])).wait is True
    streaming = SinkConfig.from_options(streaming_to_tinybird.StreamingToTinybirdOptions(
        ["--max_buffering_secs=0.5"]))
    assert streaming.max_buffering_secs == 0.5


@pytest.mark.parametrize("argv, message", [
    (["--datasource=bad name"], r"^--datasource must match \[A-Za-z_\]"),
    (["--datasource=events_quarantine"], r"^--datasource must not name a quarantine data source .*got 'events_quarantine'$"),
    (["--api_url=ftp://x", "--datasource=e"], r"^--api_url must be an http:// or https:// URL"),
    (["--token=t", "--token_secret=projects/p/secrets/s/versions/1"], r"^give either token or token_secret"),
    (["--token_secret=tinybird-token"], r"^--token_secret must be a Secret Manager secret version, projects/"),
    (["--token_env=1BAD"], r"^--token_env must be an environment variable name"),
    (["--token_env=MY-TOKEN"], r"^--token_env must be an environment variable name .*got 8 characters, '-' at position 2 \(the value is not shown"),
    (["--compression=brotli"], r"^--compression must be 'zstd', 'gzip' or None, got 'brotli'"),
    (["--num_shards=0"], r"^--num_shards must be at least 1, got 0"),
    (["--max_windows_per_bundle=0"], r"^--max_windows_per_bundle must be at least 1, got 0"),
    (["--max_batch_bytes=1"], r"^--max_batch_bytes must be at least 2, got 1"),
    (["--max_batch_bytes=100000001"], r"^--max_batch_bytes must be at most 100000000 \(100 MB: "),
    (["--max_batch_rows=0"], r"^--max_batch_rows must be at least 1, got 0"),
    (["--dead_letter_format=csv"], r"^--dead_letter_format must be one of \('json', 'avro'\), got 'csv'"),
    (["--dead_letter_path= "], r"^--dead_letter_path is empty"),
    (["--api_url=https://api.tinybird.co"], r"^--datasource is required with --api_url"),
])
def test_the_sinks_own_checks_refuse_bad_options_naming_them(argv, message):
    """The pipelines check nothing themselves: building the sink does, and its message names the option."""
    with pytest.raises(UsageError, match=message):
        files_to_tinybird.run(argv)


@pytest.mark.parametrize("argv, message", [
    (["--max_buffering_secs=0"], r"^--max_buffering_secs must be positive, got 0"),
    (["--max_buffering_secs=nan"], r"^--max_buffering_secs must be finite, got nan"),
    (["--max_buffering_secs=inf"], r"^--max_buffering_secs must be finite, got inf"),
])
def test_the_streaming_options_are_checked_by_the_sink_too(argv, message):
    with pytest.raises(UsageError, match=message):
        streaming_to_tinybird.run([*argv, "--input_subscription=projects/my-project/subscriptions/s"])


def test_defaults_are_the_sinks():
    import inspect

    from sinks.tinybird import WriteToTinybird

    sink = {name: p.default for name, p in inspect.signature(WriteToTinybird).parameters.items()}
    config = SinkConfig.from_options(streaming_to_tinybird.StreamingToTinybirdOptions(
        ["--api_url=https://api.tinybird.co", "--datasource=e"]))
    for name in ("token_env", "compression", "max_batch_bytes", "max_batch_rows", "num_shards",
                 "max_windows_per_bundle", "max_buffering_secs", "dead_letter_format", "wait"):
        assert getattr(config, name) == sink[name], name


def test_the_token_never_shows():
    config = SinkConfig(datasource="events", api_url="https://api.tinybird.co", token="p.secret-value")
    assert "secret-value" not in repr(config)
    assert "secret-value" not in repr(Endpoint(api_url="http://127.0.0.1:1", token="p.secret-value"))
    with pytest.raises(ValueError) as error:
        SinkConfig(datasource="events", token="p.secret-value", token_secret="projects/p/secrets/s/versions/1")
    assert "secret-value" not in str(error.value)


@pytest.mark.parametrize("argv", [
    ["--token", "p.secret", "--datasource", "e"],
    ["--datasource", "e", "--token=p.secret"],
])
def test_the_token_is_kept_out_of_the_jobs_pipeline_options(argv):
    options = beam_options_without_secrets(argv)
    assert options.get_all_options(retain_unknown_options=True).get("token") is None
    assert "p.secret" not in str(options.get_all_options(retain_unknown_options=True))
    assert options.get_all_options()["datasource"] == "e"


def test_parse_bool():
    assert [parse_bool(v) for v in ("true", "True", "1", "yes", "false", "0", "no")] == [
        True, True, True, True, False, False, False]
    with pytest.raises(Exception, match="expected true or false"):
        parse_bool("maybe")


def test_progress_is_counted_and_logged(caplog):
    caplog.set_level(logging.INFO, logger="pipelines")
    do_fn = CountRowsDoFn(report_every_secs=0.0)
    do_fn.setup()
    assert list(do_fn.process("a")) == ["a"] and list(do_fn.process("b")) == ["b"]
    do_fn.finish_bundle()
    messages = [r.getMessage() for r in caplog.records if r.name == "pipelines._progress"]
    assert messages[0].startswith("read 1 rows (") and messages[1].startswith("read 2 rows (")
    assert messages[0].endswith(" rows/s)")


def test_counting_rows_passes_elements_through():
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | beam.Create(range(1000)) | beam.ParDo(CountRowsDoFn())
        assert_that(out, equal_to(list(range(1000))))


def test_summary_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = RunSummary(
        rows_read=1200, rows_acknowledged=1100, rows_quarantined=7, dead_letters=100,
        dead_letters_by_kind={"rejected": 99, "unencodable": 1}, requests=12, retries=2, extra={},
        elapsed_secs=3.25, dead_letter_files=(str(tmp_path / "dl" / "dead-letters-x.jsonl"),))
    config = SinkConfig(datasource="events", api_url="https://api.tinybird.co", wait=True,
                        dead_letter_path=str(tmp_path / "dl") + "/")
    text = format_summary(summary, title="Files to Tinybird", config=config,
                          endpoint=Endpoint(api_url="https://api.tinybird.co"),
                          dead_letter_path=config.dead_letter_path)
    assert text.splitlines()[:9] == [
        "Files to Tinybird: finished in 3.2 s, data source 'events' at https://api.tinybird.co",
        "  rows read                 1,200",
        "  rows acknowledged         1,100",
        "  rows quarantined              7   (in events_quarantine)",
        "  rows stored               1,093   (acknowledged - quarantined)",
        "  dead letters                100   (rejected: 99, unencodable: 1)",
        "  requests (retries)           12   (2 retries)",
        "  dead-letter files in ./dl/:",
        "    ./dl/dead-letters-x.jsonl",
    ]
    assert ("python -m pipelines.replay_dead_letters --input './dl/dead-letters*' --datasource events "
            "--dead_letter_path ./dl-replayed/ --api_url https://api.tinybird.co") in text
    assert "emulator" not in text  # no local server in this run


class _HoldingServer:
    """The embedded server, as the summary reads it: what it holds by data source."""

    def __init__(self, held: dict[str, dict]) -> None:
        self._held = held

    def flush(self) -> None:
        pass

    def datasources(self) -> dict[str, dict]:
        return self._held


@pytest.mark.parametrize("held", [{}, {"other": {"rows": 5, "quarantined": 0}}])
def test_a_routed_run_whose_data_sources_the_server_does_not_hold_prints_no_empty_heading(tmp_path, held):
    """A replay whose every line failed again (no data source of it on the server): the summary
    shows no "Look at the data" heading without a command under it; with a data source, both."""
    summary = RunSummary(rows_read=2, rows_acknowledged=0, rows_quarantined=0, dead_letters=2,
                         dead_letters_by_kind={"rejected": 2}, requests=1, retries=0, extra={}, elapsed_secs=1.0,
                         by_datasource={"gone": DatasourceFigures(rows_acknowledged=0, dead_letters=2)})
    config = SinkConfig(datasource_of=lambda line: "gone")  # the replay's: each line to its record's
    endpoint = Endpoint(api_url="http://127.0.0.1:1", server=_HoldingServer(held), data_dir=tmp_path / "data")
    text = format_summary(summary, title="Replay", config=config, endpoint=endpoint, dead_letter_path=None)
    assert "Look at the data" not in text and "tinybird_emulator sql" not in text, text
    assert "tinybird_emulator serve" not in text, text
    summary = dataclasses.replace(summary, rows_acknowledged=2, dead_letters=0, dead_letters_by_kind={},
                                  by_datasource={"gone": DatasourceFigures(rows_acknowledged=2, dead_letters=0)})
    text = format_summary(summary, title="Replay", config=config,
                          endpoint=dataclasses.replace(endpoint, server=_HoldingServer(
                              {**held, "gone": {"rows": 2, "quarantined": 0}})), dead_letter_path=None)
    heading = text.splitlines().index("Look at the data (read-only, straight from the data dir; no server needed):")
    assert 'SELECT count(*) FROM gone"' in text.splitlines()[heading + 1]


def _replay_hint(dead_letter_path: str, *, label: str | None) -> tuple[str, str]:
    """The (--input, --dead_letter_path) of the replay command a run's summary prints for ``dead_letter_path``."""
    import shlex

    summary = RunSummary(rows_read=1, rows_acknowledged=0, rows_quarantined=0, dead_letters=1,
                         dead_letters_by_kind={"rejected": 1}, requests=1, retries=0, extra={}, elapsed_secs=1.0)
    config = SinkConfig(datasource="events", api_url="https://api.tinybird.co", dead_letter_path=dead_letter_path,
                        dead_letter_label=label)
    text = format_summary(summary, title="Files to Tinybird", config=config,
                          endpoint=Endpoint(api_url="https://api.tinybird.co"), dead_letter_path=dead_letter_path)
    (command,) = [line for line in text.splitlines() if "-m pipelines.replay_dead_letters" in line]
    words = shlex.split(command)
    return words[words.index("--input") + 1], words[words.index("--dead_letter_path") + 1]


_HINT_CASES = [
    # dead-letter path (W: the working directory, E: a folder outside it), its files, where the replay writes
    ("dl", "./dl/{files}", "./dl-replayed/"),
    ("dl/", "./dl/{files}", "./dl-replayed/"),
    ("./sub/dl//", "./sub/dl/{files}", "./sub/dl-replayed/"),
    ("W/dl", "./dl/{files}", "./dl-replayed/"),
    ("W/sub/dl/", "./sub/dl/{files}", "./sub/dl-replayed/"),
    ("E/dl", "E/dl/{files}", "E/dl-replayed/"),
    ("E/dl/", "E/dl/{files}", "E/dl-replayed/"),
    (".", "./{files}", "E/work-replayed/"),
    ("./", "./{files}", "E/work-replayed/"),
    ("W", "./{files}", "E/work-replayed/"),
    ("..", "E/{files}", "E-replayed/"),
    ("/", "/{files}", "/replayed/"),
    ("gs://bucket", "gs://bucket/{files}", "gs://bucket/replayed/"),
    ("gs://bucket/", "gs://bucket/{files}", "gs://bucket/replayed/"),
    ("gs://bucket/dl", "gs://bucket/dl/{files}", "gs://bucket/dl-replayed/"),
    ("gs://bucket/dl/", "gs://bucket/dl/{files}", "gs://bucket/dl-replayed/"),
    ("gs://bucket/a/dl/", "gs://bucket/a/dl/{files}", "gs://bucket/a/dl-replayed/"),
    ("s3://bucket", "s3://bucket/{files}", "s3://bucket/replayed/"),
    ("s3://bucket/", "s3://bucket/{files}", "s3://bucket/replayed/"),
    ("s3://bucket/a/dl", "s3://bucket/a/dl/{files}", "s3://bucket/a/dl-replayed/"),
]


@pytest.mark.parametrize("label", ["20261207T081502Z-3fa9c1", None])
@pytest.mark.parametrize("path, files_in, replayed", _HINT_CASES)
def test_the_replay_hint_reads_the_runs_files_and_writes_next_to_them_in_the_same_bucket(
        tmp_path, monkeypatch, path, files_in, replayed, label):
    """At a bucket root (gs://bucket, gs://bucket/) the hint wrote to another bucket (gs://bucket-replayed/),
    at / to '-replayed/' (an option, to the shell), at . to '.-replayed/' (inside the input: refused)."""
    import fnmatch

    from pipelines.replay_dead_letters import check_output_outside_input

    work, elsewhere = tmp_path / "work", tmp_path
    (work / "dl").mkdir(parents=True)
    monkeypatch.chdir(work)

    def place(text: str) -> str:
        return text.replace("W", str(work)) if text.startswith("W") else text.replace("E", str(elsewhere), 1)
    files = f"dead-letters-{label}-*" if label else "dead-letters*"
    source, target = _replay_hint(place(path), label=label)
    assert (source, target) == (place(files_in.format(files=files)), place(replayed))
    # The replay takes it, and the files it writes there are not among those it reads.
    check_output_outside_input(source, target)
    written = target + f"dead-letters-{label or ''}-next-00000-of-00001.jsonl"
    assert not fnmatch.fnmatch(written, source)
    folder = place(path).rstrip("/") if "://" in path else os.path.abspath(place(path))
    run_file = f"{folder.rstrip('/')}/dead-letters-{label or 'x'}-00000-of-00001.jsonl"
    assert fnmatch.fnmatch(run_file, source if "://" in source else os.path.abspath(source))


def test_display_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert display_path(str(tmp_path / "a" / "b.jsonl")) == "./a/b.jsonl"
    assert display_path(str(tmp_path / "dl") + "/") == "./dl/"
    assert display_path("/elsewhere/x") == "/elsewhere/x"
    assert display_path("gs://b/x/") == "gs://b/x/"


@pytest.mark.parametrize("path, expected", [
    ("data/*.ndjson", "ndjson"), ("a.jsonl", "ndjson"), ("a.JSONL.GZ", "ndjson"), ("gs://b/x/*.json", "json"),
    ("x.json.zst", "json"), ("x.csv.bz2", "csv"), ("x.avro", "avro"), ("s3://b/p/*.parquet", "parquet"),
    ("x.pq", "parquet"), ("data/*", None), ("x.txt", None), ("x.gz", None),
    ("x.avro.gz", "avro"), ("x.parquet.zst", "parquet"),  # told, to be refused with why
])
def test_format_from_path(path, expected):
    assert format_from_path(path) == expected


@pytest.mark.parametrize("path, suffix", [
    ("a.csv.gz", ".gz"), ("gs://b/x/*.JSONL.ZST", ".zst"), ("x.ndjson.zstd", ".zstd"), ("x.lzma", ".lzma"),
    ("x.csv", None), ("data/*", None), ("gz/x.csv", None),
])
def test_compression_suffix(path, suffix):
    assert compression_suffix(path) == suffix


def test_an_uncompressed_file_read_in_ranges_gives_the_lines_readfromtext_gives(tmp_path):
    # Beam's text source (what ReadFromText reads a range with) over the same ranges and over the
    # whole file: line ends (\n, \r\n; a lone \r is no end), a range ending inside a line or
    # between \r and \n, a last line with no end, an empty file.
    path = str(tmp_path / "lines")
    text_source = textio._TextSource(path, 0, CompressionTypes.UNCOMPRESSED, True, BytesCoder(), validate=False)
    pieces = [b"a", b"bb", b"\r", b"\n", b"\r\n", b'{"x": 1}', b"\xef\xbb\xbf", b" "]
    randomness = random.Random(7)
    for _ in range(200):
        data = b"".join(randomness.choices(pieces, k=randomness.randrange(0, 30)))
        (tmp_path / "lines").write_bytes(data)
        expected = list(text_source.read_records(path, OffsetRangeTracker(0, len(data))))
        for range_bytes in (1, 2, 3, 7, 64):
            ranges = list(OffsetRange(0, len(data)).split(range_bytes))
            assert [line for r in ranges for line in _lines_starting_in(path, r.start, r.stop)] == expected
            assert [line for r in ranges for line in text_source.read_records(
                path, OffsetRangeTracker(r.start, r.stop))] == expected


@pytest.mark.parametrize("text, expected", [
    ("", None), ("0", 0), ("-12", -12), ("+7", 7), ("007", "007"), ("12.50", 12.5), ("-1.5e2", -150.0),
    ("1e3", 1000.0), (".5", ".5"), ("1.", "1."), ("true", True), ("FALSE", False), ("NaN", "NaN"),
    ("1,5", "1,5"), ("2024-05-01", "2024-05-01"), (" 1", " 1"), ("yes", "yes"),
    # A float when it is the number (15 significant digits, or a double's own shortest text), else exact.
    ("123456789012345", 123456789012345), ("12345678901234.5", 12345678901234.5), ("-0.0", -0.0),
    ("0.30000000000000004", 0.30000000000000004), ("1.7976931348623157e308", 1.7976931348623157e308),
    ("2.3e-308", 2.3e-308), ("5e-324", decimal.Decimal("5e-324")), ("12.500000000000000000", 12.5),  # subnormal
    ("1234567890123456.7", decimal.Decimal("1234567890123456.7")), ("2e308", decimal.Decimal("2e308")),
    ("2.4703282292062328e-324", decimal.Decimal("2.4703282292062328e-324")),  # rounds to 5e-324
    ("0.1000000000000000055511151231257827", decimal.Decimal("0.1000000000000000055511151231257827")),
    ("1e999", decimal.Decimal("1e999")), ("-1e999", decimal.Decimal("-1e999")),
    ("1e-400", decimal.Decimal("1e-400")),
    # Integers wider than 64 bits are exact ints; longer than Python converts, the text.
    ("123456789012345678901234567890", 123456789012345678901234567890),
    ("9" * 5000, "9" * 5000), ("1e99999999999999999999", "1e99999999999999999999"),
])
def test_csv_values_are_typed_only_where_unambiguous(text, expected):
    value = csv_value(text)
    assert value == expected and type(value) is type(expected)
    if isinstance(value, decimal.Decimal):
        assert encode_element({"x": value}) == b'{"x":' + str(value).encode() + b"}"


def test_binary_safe_record():
    import datetime
    import decimal

    record = {"b": b"\x00\xff", "d": decimal.Decimal("1.10"), "n": {"t": datetime.datetime(2024, 1, 2, 3, 4, 5)}}
    assert binary_safe_record(record) == b'{"b":"AP8=","d":1.10,"n":{"t":"2024-01-02T03:04:05Z"}}'
    odd = {"x": object()}
    assert binary_safe_record(odd) is odd  # left for the sink to dead-letter with its reason


def test_unreadable_records_pickle_and_show_why():
    record = UnreadableRecord(path="/d/a.csv", position="line 3", reason="4 values for 3 columns", text="1,2,3,4")
    assert pickle.loads(pickle.dumps(record)) == record
    assert repr(record) == "UnreadableRecord(/d/a.csv line 3: 4 values for 3 columns; text='1,2,3,4')"


def test_an_unreadable_record_keeps_its_reason_whole_in_a_dead_letter_of_either_format(tmp_path):
    # A local file name that is not UTF-8 (a lone surrogate), a long path, a long text.
    path = "/data/" + "p" * 150 + "/caf\udce9.csv"
    reason = "unexpected end of data inside a quoted field never closed (4 lines read as this one record)"
    record = UnreadableRecord(path=path, position="lines 3-6", reason=reason, text='2,"b\n3,c\n' * 100)
    shown = element_repr(record)
    assert shown == repr(record) and len(shown) == 400  # the sink's cut, which would take out the middle
    assert shown.startswith(f"UnreadableRecord(/data/{'p' * 150}/caf\\udce9.csv lines 3-6: {reason}; text='2,")
    assert shown.endswith("...)")
    letter = DeadLetter(kind="unencodable", line=None, element=shown, datasource="d", status=None,
                        message="m", attempts=0, first_attempt_at="", last_attempt_at="", window="global")
    assert orjson.loads(to_json_line(letter))["element"] == shown
    with open(tmp_path / "x.avro", "wb") as fh:
        fastavro.writer(fh, AVRO_SCHEMA, [letter._asdict()])
    with open(tmp_path / "x.avro", "rb") as fh:
        assert [r["element"] for r in fastavro.reader(fh)] == [shown]


def _summary(*, rows_read: int, dead_letters: int) -> RunSummary:
    return RunSummary(rows_read=rows_read, rows_acknowledged=rows_read - dead_letters, rows_quarantined=0,
                      dead_letters=dead_letters, dead_letters_by_kind={}, requests=1, retries=0, extra={},
                      elapsed_secs=1.0)


@pytest.mark.parametrize("rows_read, dead_letters, max_ratio, fails", [
    (100, 1, 0.01, False),     # exactly at the ratio: passes
    (100, 2, 0.01, True),
    (5000, 2, 0.01, False),    # the sample data
    (5000, 2, 0.0, True),      # 0: any dead letter fails
    (100, 100, 1.0, False),    # 1: never fails
    (0, 0, 0.0, False),        # nothing read, nothing lost
    (0, 3, 0.5, True),         # dead letters without rows read (replayed records carried over)
])
def test_judge(rows_read, dead_letters, max_ratio, fails):
    judged = judge(_summary(rows_read=rows_read, dead_letters=dead_letters), max_dead_letter_ratio=max_ratio)
    assert (judged.failure is not None) is fails
    if fails:
        assert judged.failure.startswith(f"{dead_letters:,} of {rows_read:,} rows read were dead-lettered (")


@pytest.mark.parametrize("options_class", [files_to_tinybird.FilesToTinybirdOptions,
                                           streaming_to_tinybird.StreamingToTinybirdOptions])
def test_datasource_field_routes_by_a_field_with_its_prefix(options_class):
    from sinks.tinybird import DatasourceFromField

    config = SinkConfig.from_options(options_class(
        ["--api_url=https://api.tinybird.co", "--datasource_field=type", "--datasource_prefix=events_"]))
    assert (config.datasource, config.datasource_field, config.datasource_prefix) == (None, "type", "events_")
    assert config.routed and config.destination == DatasourceFromField("type", prefix="events_")
    assert config.destination({"type": "click", "id": 1}) == "events_click"
    assert config.describe_destination() == "data sources from field 'type', prefixed 'events_'"
    embedded = SinkConfig.from_options(options_class(["--datasource_field", "kind"]))
    assert embedded.embedded and embedded.datasource is None and embedded.destination == DatasourceFromField("kind")
    assert SinkConfig.from_options(options_class([])).destination == "events"


@pytest.mark.parametrize("argv, message", [
    (["--datasource=e", "--datasource_field=type"], r"^give --datasource or --datasource_field, not --datasource and --datasource_field$"),
    (["--datasource_field="], r"^--datasource_field must name a field, got ''$"),
    (["--datasource_field= "], r"^--datasource_field must name a field, got ' '$"),
    (["--datasource_field=type", "--datasource_prefix=1st_"], r"^--datasource_prefix must be letters, digits and _, not starting with a digit, .* got '1st_'$"),
    (["--datasource_field=type", "--datasource_prefix=web-"], r"^--datasource_prefix must be .* got 'web-'$"),
    (["--datasource_field=type", f"--datasource_prefix={'p' * 100}"], r"^--datasource_prefix must be .* at most 99 characters"),
    (["--datasource=e", "--datasource_prefix=events_"], r"^--datasource_prefix 'events_' is only used with --datasource_field$"),
    (["--api_url=https://api.tinybird.co", "--datasource_prefix=events_"], r"^--datasource is required with --api_url \(or --datasource_field"),
])
def test_datasource_field_options_are_checked(argv, message):
    with pytest.raises(UsageError, match=message):
        files_to_tinybird.run(argv)
    with pytest.raises(UsageError, match=message):
        streaming_to_tinybird.run([*argv, "--input_subscription=projects/my-project/subscriptions/s"])


def test_the_replay_routes_by_record_and_refuses_datasource_field():
    config = SinkConfig.from_options(replay_dead_letters.ReplayDeadLettersOptions(
        ["--api_url=https://api.tinybird.co"]), datasource_of=replay_dead_letters.record_datasource)
    assert config.routed and config.destination is replay_dead_letters.record_datasource
    assert config.describe_destination() == "data sources named by each record"
    explicit = SinkConfig.from_options(replay_dead_letters.ReplayDeadLettersOptions(
        ["--api_url=https://api.tinybird.co", "--datasource=all_here"]),
        datasource_of=replay_dead_letters.record_datasource)
    assert not explicit.routed and explicit.destination == "all_here"
    for flag in ("--datasource_field=type", "--datasource_prefix=x_"):
        with pytest.raises(UsageError, match=rf"^{flag.split('=')[0]} is not a replay option"):
            replay_dead_letters.run(["--input=dl/*", "--dead_letter_path=out/", flag])


def test_summary_text_with_a_data_source_per_row(tmp_path, monkeypatch):
    from pipelines._summary import DatasourceFigures

    monkeypatch.chdir(tmp_path)
    summary = RunSummary(
        rows_read=100, rows_acknowledged=90, rows_quarantined=3, dead_letters=10,
        dead_letters_by_kind={"rejected": 6, "unroutable": 4}, requests=3, retries=0, extra={},
        elapsed_secs=1.0, by_datasource={
            "ev_a": DatasourceFigures(rows_acknowledged=30, dead_letters=0),
            "ev_b": DatasourceFigures(rows_acknowledged=60, dead_letters=6),
            "ev_bad_": DatasourceFigures(rows_acknowledged=0, dead_letters=1)})
    config = SinkConfig(datasource_field="type", datasource_prefix="ev_", api_url="https://api.tinybird.co",
                        wait=True, dead_letter_path=str(tmp_path / "dl") + "/")
    text = format_summary(summary, title="Files to Tinybird", config=config,
                          endpoint=Endpoint(api_url="https://api.tinybird.co"),
                          dead_letter_path=config.dead_letter_path)
    lines = text.splitlines()
    assert lines[0] == ("Files to Tinybird: finished in 1.0 s, data sources from field 'type', prefixed 'ev_' "
                        "at https://api.tinybird.co")
    assert lines[3] == "  rows quarantined              3   (in each data source's <name>_quarantine)"
    start = lines.index("  by data source (3):")
    assert lines[start + 1:start + 6] == [
        "                         acknowledged dead letters",
        "    ev_b                           60            6",
        "    ev_a                           30            0",
        "    ev_bad_                         0            1",
        "    (no data source)                0            3",
    ]
    # The replay sends each line back to its record's data source: no --datasource in the hint.
    assert ("python -m pipelines.replay_dead_letters --input './dl/dead-letters*' --dead_letter_path ./dl-replayed/ "
            "--api_url https://api.tinybird.co") in text
    assert "those that name none need --datasource NAME" in text
