"""Streaming to Tinybird: the job's body fed by a TestStream (Pub/Sub cannot be reached here)."""

from __future__ import annotations

import ast
import json

import apache_beam as beam
import orjson
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from hypothesis import given, settings
from hypothesis import strategies as st
from pipelines_testlib import RUNNERS
from shared_testlib import dead_letters_in

from pipelines import streaming_to_tinybird
from pipelines._endpoint import Endpoint
from pipelines._options import SinkConfig, UsageError
from pipelines._summary import summarise
from pipelines.streaming_to_tinybird import build, check_source, split_message
from tinybird_emulator import LocalServer

_FIRST = "[1970-01-01T00:00:00Z, 1970-01-01T00:01:00Z)"
_SECOND = "[1970-01-01T00:01:00Z, 1970-01-01T00:02:00Z)"


def _message(i: int, **more) -> bytes:
    return json.dumps({"id": i, "kind": "click", **more}).encode()


def _stream() -> TestStream:
    return (
        TestStream()
        .advance_watermark_to(0)
        # Window [0, 60): five single events, an NDJSON message of two, a pretty-printed
        # one, and one that is not JSON.
        .add_elements([TimestampedValue(_message(i), i) for i in range(1, 6)])
        .add_elements([
            TimestampedValue(_message(6) + b"\n" + _message(7) + b"\n", 10),
            TimestampedValue(json.dumps({"id": 8, "kind": "click"}, indent=2).encode(), 20),
            TimestampedValue(b"not json at all", 30),
        ])
        .advance_processing_time(5)
        .advance_watermark_to(59)
        # Window [60, 120): three events, a JSON array and an empty message.
        .add_elements([TimestampedValue(_message(100 + i), 60 + i) for i in range(1, 4)])
        .add_elements([TimestampedValue(b"[1, 2]", 70), TimestampedValue(b"", 75)])
        .advance_watermark_to(200)
        # Dead-letter files of unbounded input are closed by a processing-time trigger.
        .advance_processing_time(120)
        .advance_watermark_to_infinity()
    )


def test_streaming_body_delivers_every_row_per_window_and_dead_letters_bad_messages(tmp_path):
    with LocalServer(data_dir=tmp_path / "tb", rate_limit_rps=None) as server:
        config = SinkConfig(datasource="clicks", api_url=server.url, wait=True, num_shards=1,
                            max_buffering_secs=3600, dead_letter_path=str(tmp_path / "dead") + "/")
        options = PipelineOptions([])
        options.view_as(StandardOptions).streaming = True
        p = TestPipeline(options=options)
        result = build(p | _stream(), window_secs=60,
                       write=config.write_transform(Endpoint(api_url=server.url, token=server.token)))
        assert_that(
            result.dead_letters | beam.Map(lambda d: (d.kind, d.window, d.line, d.message.split(":")[0])),
            equal_to([
                ("unencodable", _FIRST, None, "invalid JSON"),
                ("unencodable", _SECOND, None, "JSON value is a list, not an object"),
                ("unencodable", _SECOND, None, "invalid JSON"),
            ]))
        outcome = p.run()
        outcome.wait_until_finish()

        server.flush()
        ids = [r["id"] for r in server.query("SELECT id FROM clicks ORDER BY id")]
        assert ids == [1, 2, 3, 4, 5, 6, 7, 8, 101, 102, 103]
        # One request per window: batches are cut per window, each sent when its window closes.
        assert server.stats()["requests"]["total"] == 2
        # Not checked through metrics: with a TestStream, Beam's Python DirectRunner
        # keeps the counters of the first bundle only (Beam 2.77).
        letters = dead_letters_in(tmp_path / "dead")
        assert sorted((d.window, d.element) for d in letters) == [
            (_FIRST, "b'not json at all'"), (_SECOND, "b''"), (_SECOND, "b'[1, 2]'")]


@pytest.mark.parametrize("runner", ["direct", "multi_processing"])
def test_streaming_body_on_the_batch_runners(server, datasource, runner, tmp_path):
    """The same body on bounded input (a replayed hour of messages): the runner's FnApi path."""
    messages = [(_message(i, at=i * 30), i * 30) for i in range(40)]  # windows of 60 s: 20 windows
    messages += [(b"{oops", 95), (b'"just a string"', 1000)]
    config = SinkConfig(datasource=datasource, api_url=server.url, wait=True, num_shards=2)
    p = beam.Pipeline(options=PipelineOptions(RUNNERS[runner]))
    timestamped = (p | beam.Create(messages, reshuffle=False)
                   | beam.Map(lambda m: TimestampedValue(m[0], m[1])))
    result = build(timestamped, window_secs=60,
                   write=config.write_transform(Endpoint(api_url=server.url, token=server.token)))
    assert_that(
        result.dead_letters | beam.Map(lambda d: (d.kind, d.window, d.element)),
        equal_to([
            ("unencodable", _SECOND, "b'{oops'"),
            ("unencodable", "[1970-01-01T00:16:00Z, 1970-01-01T00:17:00Z)", "b'\"just a string\"'"),
        ]))
    outcome = p.run()
    outcome.wait_until_finish()

    server.flush()
    stored = server.query(f"SELECT id, at FROM {datasource} ORDER BY id")
    assert [(r["id"], r["at"]) for r in stored] == [(i, i * 30) for i in range(40)]
    summary = summarise(outcome, elapsed_secs=0.0)
    assert summary.rows_read == 42 and summary.rows_acknowledged == 40 and summary.dead_letters == 2


def test_split_message():
    assert list(split_message(b'{"a": 1}')) == [b'{"a": 1}']
    assert list(split_message(b'  {"a": 1}\n')) == [b'  {"a": 1}\n']  # the sink leaves the whitespace out
    assert list(split_message(b'\x0c{"a": 1}\x0b')) == [b'{"a": 1}']  # not JSON whitespace, but JSON inside
    assert list(split_message(b'{"a": 1}\r\n\n{"b": 2}\r\n')) == [b'{"a": 1}', b'{"b": 2}']
    pretty = b'{\n  "a": 1,\n  "b": [1, 2]\n}\n'
    assert list(split_message(pretty)) == [pretty.strip()]
    assert list(split_message(b"not json")) == [b"not json"]
    # NDJSON with a bad line among objects: a row per line, the bad one dead-lettered alone.
    assert list(split_message(b'{"a": 1}\n{"a": \n{"a": 3}\n')) == [b'{"a": 1}', b'{"a": ', b'{"a": 3}']
    # No line is an object (a pretty-printed object cut short, text): the message whole, one dead letter.
    cut = b'{\n  "a": 1,\n  "b": [1, 2],\n'
    assert list(split_message(cut)) == [cut]
    assert list(split_message(b"line one\r\nline two\n")) == [b"line one\r\nline two\n"]
    assert list(split_message(b"")) == [b""]  # not dropped: the sink dead-letters it


def test_source_options_are_checked():
    def options(*argv):
        return streaming_to_tinybird.StreamingToTinybirdOptions(list(argv))

    check_source(options("--input_subscription", "projects/my-project/subscriptions/s"))
    check_source(options("--input_topic", "projects/my-project/topics/t"))
    with pytest.raises(UsageError, match="exactly one"):
        check_source(options())
    with pytest.raises(UsageError, match="exactly one"):
        check_source(options("--input_subscription", "projects/my-project/subscriptions/s",
                             "--input_topic", "projects/my-project/topics/t"))
    with pytest.raises(UsageError, match="projects/PROJECT/subscriptions/NAME"):
        check_source(options("--input_subscription", "my-subscription"))
    assert options("--window_secs", "15").window_secs == 15
    with pytest.raises(SystemExit):
        options("--window_secs", "0")


PROJECTS = ["p", "P", "0", "12345678", "abcde", "abcdef", "my-project", "My-Project", "my-project-", "-my-project",
            "my_project", "example.com:my-project", "a" * 63, "a" * 64, "my-project ", "my-proj\u00e9ct"]


def _beam_refusal(subscription: str | None, topic: str | None) -> str | None:
    from apache_beam.io.gcp.pubsub import ReadFromPubSub

    try:
        ReadFromPubSub(subscription=subscription, topic=topic)
    except ValueError as error:
        return str(error)
    return None


def _check_source_takes(*argv: str) -> bool:
    try:
        check_source(streaming_to_tinybird.StreamingToTinybirdOptions(list(argv)))
    except UsageError:
        return False
    return True


def _check_agrees_with_beam(project: str) -> None:
    for flag, value, subscription, topic in (
            ("--input_subscription", f"projects/{project}/subscriptions/s", f"projects/{project}/subscriptions/s", None),
            ("--input_topic", f"projects/{project}/topics/t", None, f"projects/{project}/topics/t")):
        if _check_source_takes(flag, value):
            assert _beam_refusal(subscription, topic) is None, (flag, value)


@pytest.mark.parametrize("project", PROJECTS)
def test_a_source_the_options_take_is_one_beam_reads(project):
    """projects/p/subscriptions/s (a project id Beam refuses: too short, upper case, a number) passed the
    check and the template's regex, then Beam refused it when the job's graph was built: on a
    template, at launch, with a traceback; here, after the local server had started."""
    _check_agrees_with_beam(project)


@settings(max_examples=200, deadline=None)
@given(project=st.from_regex(r"[-a-zA-Z0-9:._ ]{0,70}", fullmatch=True) | st.text(max_size=12))
def test_every_source_the_options_take_is_one_beam_reads(project):
    _check_agrees_with_beam(project)


def test_a_pubsub_project_is_checked_as_beam_checks_it():
    from apache_beam.io.gcp import pubsub

    assert streaming_to_tinybird.PROJECT_PATTERN == pubsub.PROJECT_ID_REGEXP
    with pytest.raises(UsageError, match=r"^--input_subscription must look like projects/PROJECT/subscriptions/NAME, "
                                         r"PROJECT a project id: .* got 'projects/p/subscriptions/s'$"):
        check_source(streaming_to_tinybird.StreamingToTinybirdOptions(["--input_subscription=projects/p/subscriptions/s"]))
    with pytest.raises(UsageError, match=r"^--input_topic must look like projects/PROJECT/topics/NAME, PROJECT a"):
        check_source(streaming_to_tinybird.StreamingToTinybirdOptions(["--input_topic=projects/My-Project/topics/t"]))


def test_reading_pubsub_without_the_gcp_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(streaming_to_tinybird.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match=r"pip install 'beam-tinybird\[gcp\]'"):
        streaming_to_tinybird.run([
            "--input_subscription", "projects/my-project/subscriptions/s",
            "--api_url", "https://api.tinybird.co", "--datasource", "events"])


def test_the_longest_window_accepted_delivers_and_a_longer_one_is_refused(server, datasource):
    """--window_secs past what a window's end can be (999999999999999999, which the template's
    regex took) was accepted, then every bundle of the sink's first step failed encoding the
    window (OverflowError); it is refused with the other bad values now, and the longest one
    accepted delivers."""
    from pipelines.streaming_to_tinybird import MAX_WINDOW_SECS

    def options(*argv):
        return streaming_to_tinybird.StreamingToTinybirdOptions(list(argv))

    assert options("--window_secs", str(MAX_WINDOW_SECS)).window_secs == MAX_WINDOW_SECS
    for too_long in (MAX_WINDOW_SECS + 1, 999_999_999_999_999_999):
        with pytest.raises(SystemExit):
            options("--window_secs", str(too_long))
    config = SinkConfig(datasource=datasource, api_url=server.url, wait=True, num_shards=1)
    p = beam.Pipeline(options=PipelineOptions(RUNNERS["direct"]))
    now = 1_765_000_000  # December 2025
    messages = (p | beam.Create([_message(i) for i in range(5)])
                | beam.Map(lambda m: TimestampedValue(m, now)))
    result = build(messages, window_secs=MAX_WINDOW_SECS,
                   write=config.write_transform(Endpoint(api_url=server.url, token=server.token)))
    assert_that(result.dead_letters, equal_to([]))
    p.run().wait_until_finish()
    server.flush()
    assert [r["id"] for r in server.query(f"SELECT id FROM {datasource} ORDER BY id")] == list(range(5))


_BOM = b"\xef\xbb\xbf"
_PIECES = [b'{"a": 1}', b'{"a": "x y"}', b"{oops", b"[1]", b"1", b" ", b"\t", b"\n", b"\r\n", b"\x0b", b"\x0c",
           b"\x0a\x05hello", b"\xff", b"\x1f\x8b\x08\x00", _BOM]


@settings(max_examples=1000, deadline=None)
@given(data=st.binary(max_size=40) | st.lists(st.sampled_from(_PIECES), max_size=8).map(b"".join))
def test_a_message_is_split_into_rows_without_losing_a_byte(data):
    """A message that is not JSON is passed on (to its one dead letter) byte for byte: a protobuf message
    starts with 0x0a, a newline, which was stripped, and the dead letter was then the only copy left,
    without it. An NDJSON message's lines are passed on as written (no line terminator)."""
    rows = list(split_message(data))
    source = data
    if data.startswith(_BOM) and (len(rows) > 1 or rows[0] != data):
        # A byte order mark is left out only before JSON or NDJSON, as the files job leaves it out.
        source = data[len(_BOM):]
        assert len(rows) > 1 or orjson.loads(rows[0]) is not None or rows[0].strip() == b"null"
    if len(rows) > 1:
        assert rows == [line.rstrip(b"\r") for line in source.split(b"\n") if line.strip()]
        return
    [row] = rows
    if row != source:  # one JSON value: only the whitespace around it is left out
        assert row == source.strip()
        orjson.loads(row)


@pytest.mark.parametrize("message, rows", [
    (_BOM + b'{"a": 1}', [b'{"a": 1}']),
    (_BOM + b'{\n  "a": 1\n}\n', [b'{\n  "a": 1\n}']),
    (_BOM + b'{"a": 1}\n{"a": 2}\n', [b'{"a": 1}', b'{"a": 2}']),
    (_BOM + b"not json", [_BOM + b"not json"]),
    (_BOM + b"\x0a\x05hello", [_BOM + b"\x0a\x05hello"]),
    (_BOM, [_BOM]),
])
def test_a_byte_order_mark_is_left_out_before_json_only(message, rows):
    """As the files job reads a file starting with one; a message that is not JSON keeps every byte."""
    assert list(split_message(message)) == rows


def test_a_binary_message_keeps_every_byte_in_its_dead_letter(tmp_path):
    messages = [b"\x0a\x05hello\x12\x02\x08\x01", b"\x0a\x03abc\x20", b" not json \n", b"\t{oops\n{\n"]
    with LocalServer(data_dir=tmp_path / "tb", rate_limit_rps=None) as server:
        config = SinkConfig(datasource="binary", api_url=server.url, wait=True, num_shards=1,
                            dead_letter_path=str(tmp_path / "dead") + "/")
        p = beam.Pipeline(options=PipelineOptions(RUNNERS["direct"]))
        result = build(p | beam.Create(messages), window_secs=60,
                       write=config.write_transform(Endpoint(api_url=server.url, token=server.token)))
        assert_that(result.dead_letters | beam.Map(lambda d: d.element), equal_to([repr(m) for m in messages]))
        p.run().wait_until_finish()
    assert sorted(ast.literal_eval(d.element) for d in dead_letters_in(tmp_path / "dead")) == sorted(messages)


def test_messages_with_a_byte_order_mark_are_stored(tmp_path):
    messages = [_BOM + b'{"id": 1}', _BOM + b'{"id": 2}\n{"id": 3}\n', _BOM + b'{\n  "id": 4\n}']
    with LocalServer(data_dir=tmp_path / "tb", rate_limit_rps=None) as server:
        config = SinkConfig(datasource="bom", api_url=server.url, wait=True, num_shards=1)
        p = beam.Pipeline(options=PipelineOptions(RUNNERS["direct"]))
        result = build(p | beam.Create(messages), window_secs=60,
                       write=config.write_transform(Endpoint(api_url=server.url, token=server.token)))
        assert_that(result.dead_letters, equal_to([]))
        p.run().wait_until_finish()
        server.flush()
        assert [r["id"] for r in server.query("SELECT id FROM bom ORDER BY id")] == [1, 2, 3, 4]
