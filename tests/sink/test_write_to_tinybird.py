"""WriteToTinybird end to end: real pipelines against the local Events API server."""

from __future__ import annotations

import ast
import dataclasses
import datetime
import decimal
import glob
import logging
import os
import uuid
import zlib

import apache_beam as beam
import orjson
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from shared_testlib import dead_letters_in

from sinks.tinybird import (
    DeadLetterKind,
    DeliveryError,
    ReadDeadLetters,
    RetryPolicy,
    WriteToTinybird,
)
from sinks.tinybird.dead_letters import window_text
from tinybird_emulator import LocalServer

_FAST_RETRIES = RetryPolicy(
    max_attempts=4, initial_backoff_secs=0.01, max_backoff_secs=0.05, max_total_secs=20,
    max_retry_after_secs=0.2)

_RUNNERS = {
    "direct": ["--runner=FnApiRunner"],
    "multi_processing": [
        "--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    "portable": [
        "--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LocalServer(data_dir=tmp_path_factory.mktemp("tinybird"), rate_limit_rps=None) as running:
        yield running


@pytest.fixture()
def datasource(request) -> str:
    # One data source per test, so tests on one server do not see each other's rows.
    name = request.node.name
    return f"t_{zlib.crc32(name.encode()):08x}_" + "".join(c if c.isalnum() else "_" for c in name)[:40]


def _events(n: int, *, start: int = 0, pad: int = 150) -> list[dict]:
    return [{"id": i, "kind": "view", "value": i * 0.5, "pad": "x" * pad} for i in range(start, start + n)]


def _run(build, *, runner: str = "direct"):
    """Runs a pipeline built by ``build(p)``; returns the counters of the tinybird namespace."""
    options = PipelineOptions(_RUNNERS[runner])
    p = beam.Pipeline(options=options)
    build(p)
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_namespace("tinybird"))["counters"]
    totals: dict = {}
    for counter in counters:
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + counter.committed
    return totals


def _ids(server, datasource: str) -> list[int]:
    """Every stored id, duplicates included, once everything accepted (202) is committed."""
    server.flush()
    if datasource not in server.datasources():
        return []
    return [row["id"] for row in server.query(f"SELECT id FROM {datasource} ORDER BY id")]


def _sink(server, datasource, **overrides):
    settings = dict(
        datasource=datasource, token=server.token, api_url=server.url, retry_policy=_FAST_RETRIES,
        max_batch_bytes=64 * 1024, num_shards=2, read_timeout_secs=10)
    settings.update(overrides)
    return WriteToTinybird(**settings)


@dataclasses.dataclass
class _Purchase:
    id: int
    amount: decimal.Decimal
    at: datetime.datetime


@pytest.mark.parametrize("runner", sorted(_RUNNERS))
def test_every_row_is_acknowledged_or_dead_lettered_on_every_runner(server, datasource, runner, tmp_path):
    good = _events(3000)
    unencodable = [{"id": 10_000, "bad": object()}, ["not", "an", "object"], b"\xff\xfe not utf-8"]
    oversize = [{"id": 10_001, "pad": "y" * (70 * 1024)}]
    dead_dir = tmp_path / "dlq"

    def build(p):
        (p | beam.Create(good + unencodable + oversize, reshuffle=False)
           | _sink(server, datasource, dead_letter_path=str(dead_dir) + "/"))

    counters = _run(build, runner=runner)
    assert _ids(server, datasource) == list(range(3000))
    letters = dead_letters_in(dead_dir)
    assert sorted(letter.kind for letter in letters) == sorted(
        [DeadLetterKind.UNENCODABLE.value] * 3 + [DeadLetterKind.OVERSIZE.value])
    oversize_letter = next(letter for letter in letters if letter.kind == "oversize")
    assert orjson.loads(oversize_letter.line) == oversize[0]
    assert oversize_letter.attempts == 0 and oversize_letter.window == "global"
    assert all(letter.line is None and letter.element for letter in letters if letter.kind == "unencodable")
    assert counters["elements_in"] == 3004
    assert counters["rows_acknowledged"] == 3000
    assert counters["dead_letters"] == 4


class _Shouting(str):
    def __repr__(self) -> str:
        return "not the text"


@pytest.mark.parametrize("windowing", ["global", "global, routed", "fixed", "sliding"])
def test_text_that_is_not_json_is_kept_whole_in_its_dead_letter(server, datasource, windowing, tmp_path):
    """A message or line that is not JSON may be the only copy of what it held (a Pub/Sub message is
    acknowledged): its dead letter keeps all of it, as a repr read back by ast.literal_eval, up to
    max_batch_bytes (64 KiB here); longer text and other objects are shown cut to 500 characters."""
    max_bytes = 64 * 1024
    texts = [
        '{"id": 1, "note": "' + "é\u2603 " * 3000 + '", "cut": ',   # 15,000+ characters, not JSON
        "\x00\t control characters, \\ud800 escaped " * 400 + "{",
        _Shouting("{'single': 'quotes'} " * 300),
    ]
    raw = [b"\xff\xfe not utf-8 " * 500, bytearray(b"[1, 2] " * 2000)]
    cut = ["{" * (max_bytes + 1), {"id": 2, "bad": object()}]
    dead_dir = tmp_path / "dlq"
    routed = (lambda e: datasource) if windowing == "global, routed" else datasource
    window_fn = {"fixed": beam.window.FixedWindows(60), "sliding": beam.window.SlidingWindows(60, 60)}.get(windowing)

    def build(p):
        elements = p | beam.Create([*_events(10), *texts, *raw, *cut], reshuffle=False)
        if window_fn is not None:
            elements = elements | beam.WindowInto(window_fn)
        elements | _sink(server, routed, dead_letter_path=str(dead_dir) + "/")

    _run(build)
    assert _ids(server, datasource) == list(range(10))
    letters = dead_letters_in(dead_dir)
    assert all(letter.kind == "unencodable" and letter.line is None for letter in letters)
    shown = [letter.element for letter in letters]
    assert len(shown) == len(texts) + len(raw) + len(cut)
    too_long = [text for text in shown if text.startswith("'{{{{")]
    assert len(too_long) == 1 and len(too_long[0]) <= 500 and too_long[0].endswith(f"...[{max_bytes + 1} chars]")
    an_object = [text for text in shown if "<object object at" in text]
    assert len(an_object) == 1 and "'id': 2" in an_object[0]
    whole = [ast.literal_eval(text) for text in shown if text not in too_long + an_object]
    assert sorted(whole, key=repr) == sorted([str(t) for t in texts] + [bytes(r) for r in raw], key=repr)


@pytest.mark.parametrize("windowing", ["global", "fixed"])
def test_twenty_thousand_rows_are_each_stored_once(server, datasource, windowing):
    """The check every cell of the Beam/Python matrix runs (README, "Supported versions")."""
    from apache_beam.transforms.window import FixedWindows, TimestampedValue

    events = _events(20_000, pad=20)

    def build(p):
        rows = p | beam.Create([TimestampedValue(e, e["id"] // 100) for e in events], reshuffle=False)
        if windowing == "fixed":
            rows = rows | beam.WindowInto(FixedWindows(60))
        rows | _sink(server, datasource, max_batch_bytes=256 * 1024)

    counters = _run(build)
    assert _ids(server, datasource) == list(range(20_000))
    assert counters["rows_acknowledged"] == 20_000
    assert counters.get("dead_letters", 0) == 0
    # Batches are full: at most one partial batch per window and shard beyond the minimum.
    window_of = (lambda e: 0) if windowing == "global" else (lambda e: e["id"] // 100 // 60)
    window_bytes: dict[int, int] = {}
    for e in events:
        window_bytes[window_of(e)] = window_bytes.get(window_of(e), 0) + len(orjson.dumps(e)) + 1
    minimum = sum(-(-size // (256 * 1024)) for size in window_bytes.values())
    assert minimum <= counters["requests"] <= minimum + len(window_bytes) * 2


@pytest.mark.parametrize("runner", sorted(_RUNNERS))
def test_bounded_windowed_input_is_batched_per_window_on_every_runner(server, datasource, runner, tmp_path):
    """Bounded input in fixed windows: every row delivered, refused rows carry their window."""
    from apache_beam.transforms.window import FixedWindows, IntervalWindow, TimestampedValue

    good = _events(3000, pad=100)
    dead_dir = tmp_path / "dlq"

    def build(p):
        timestamped = [TimestampedValue(e, e["id"] % 30) for e in good] + [TimestampedValue({"bad": object()}, 15)]
        (p | beam.Create(timestamped, reshuffle=False)
           | beam.WindowInto(FixedWindows(10))
           | _sink(server, datasource, max_batch_bytes=16 * 1024, dead_letter_path=str(dead_dir) + "/"))

    counters = _run(build, runner=runner)
    assert _ids(server, datasource) == list(range(3000))
    letters = dead_letters_in(dead_dir)
    assert [(letter.kind, letter.window) for letter in letters] == [
        ("unencodable", window_text(IntervalWindow(10, 20)))]
    assert counters["rows_acknowledged"] == 3000
    # 3 windows of ~130 KB each in 16 KiB batches: no batch spans two windows, so at least 27 requests.
    assert counters["requests"] >= 27


def test_an_element_in_two_sliding_windows_is_sent_once_per_window(server, datasource):
    from apache_beam.transforms.window import SlidingWindows, TimestampedValue

    def build(p):
        (p | beam.Create([TimestampedValue({"id": i}, i) for i in range(100)], reshuffle=False)
           | beam.WindowInto(SlidingWindows(size=20, period=10))
           | _sink(server, datasource))

    counters = _run(build)
    assert _ids(server, datasource) == sorted(list(range(100)) * 2)
    assert counters["elements_in"] == 100 and counters["rows_acknowledged"] == 200


def test_sliding_windows_full_batches_and_dead_letters_once_per_window(server, datasource, tmp_path):
    """Beam repeats what one call emits once per window of its input: the sink must not.

    Batches fill inside the bundle (a row is in two windows), and one element
    cannot be encoded: every row is stored once per window, one dead letter per window.
    """
    from apache_beam.transforms.window import IntervalWindow, SlidingWindows, TimestampedValue

    dead_dir = tmp_path / "dlq"

    def build(p):
        elements = [TimestampedValue({"id": i}, i % 20) for i in range(600)] + [TimestampedValue({"bad": object()}, 15)]
        (p | beam.Create(elements, reshuffle=False)
           | beam.WindowInto(SlidingWindows(size=20, period=10))
           | _sink(server, datasource, max_batch_bytes=1024, dead_letter_path=str(dead_dir) + "/"))

    counters = _run(build)
    assert _ids(server, datasource) == sorted(list(range(600)) * 2)
    letters = dead_letters_in(dead_dir)
    assert sorted((letter.kind, letter.window) for letter in letters) == [
        ("unencodable", window_text(IntervalWindow(0, 20))), ("unencodable", window_text(IntervalWindow(10, 30)))]
    assert counters["elements_in"] == 601
    assert counters["dead_letters"] == 2 and counters["rows_acknowledged"] == 1200
    # 600 rows of about 12 bytes in each of 3 windows' 1 KiB batches: many filled inside the bundle.
    assert counters["requests"] >= 12


def test_types_beyond_plain_dicts_are_encoded(server, datasource):
    Row = beam.Row
    at = datetime.datetime(2026, 11, 22, 10, 30, 0, tzinfo=datetime.UTC)
    elements = [
        _Purchase(id=1, amount=decimal.Decimal("12.50"), at=at),
        Row(id=2, amount=3.25, at=at.isoformat()),
        '{"id": 3, "amount": 1.0, "at": "2026-11-22T10:30:00+00:00"}',
        b'{"id": 4, "amount": 2.0, "at": "2026-11-22T10:30:00+00:00"}',
        {"id": 5, "amount": 5.0, "at": at, "ref": uuid.UUID(int=5)},
    ]
    _run(lambda p: p | beam.Create(elements, reshuffle=False) | _sink(server, datasource))
    assert _ids(server, datasource) == [1, 2, 3, 4, 5]


def test_bounded_batches_are_full_whatever_the_bundle_size(server, datasource):
    max_batch_bytes = 32 * 1024
    def build(p):
        parts = [p | f"Part{k}" >> beam.Create(_events(200, start=k * 200, pad=100), reshuffle=False)
                 for k in range(40)]
        parts | beam.Flatten() | _sink(server, datasource, max_batch_bytes=max_batch_bytes, num_shards=2)

    options = PipelineOptions(_RUNNERS["direct"])
    p = beam.Pipeline(options=options)
    build(p)
    result = p.run()
    result.wait_until_finish()
    by_step = {d.key.step: d.committed for d in
               result.metrics().query(MetricsFilter().with_name("batch_bytes"))["distributions"]}
    full = next(d for step, d in by_step.items() if "PostFull" in step)
    merged = next(d for step, d in by_step.items() if "PostMerged" in step)
    assert len(_ids(server, datasource)) == 8000
    # The DirectRunner fuses the parts into large bundles: most batches fill
    # inside a bundle, the rest are merged (small bundles: test_batching.py).
    assert full.count > 0 and merged.count > 0
    assert max(full.max, merged.max) <= max_batch_bytes
    assert (full.sum + merged.sum) / (full.count + merged.count) >= 0.9 * max_batch_bytes


def test_rejected_batches_are_dead_lettered_with_the_servers_message(server, datasource, tmp_path):
    server.set_faults([{"datasource": datasource, "status": 400, "when": "before", "sequence": [2],
                        "message": "injected bad request"}])
    try:
        dead_dir = tmp_path / "dlq"
        counters = _run(lambda p: p | beam.Create(_events(2000), reshuffle=False) | _sink(
            server, datasource, num_shards=1, max_in_flight=1, dead_letter_path=str(dead_dir)))
    finally:
        server.clear_faults()
    stored = _ids(server, datasource)
    letters = dead_letters_in(dead_dir)
    dead_ids = sorted(orjson.loads(letter.line)["id"] for letter in letters)
    assert sorted(stored + dead_ids) == list(range(2000))
    assert len(dead_ids) > 0 and len(stored) > 0
    assert {(letter.kind, letter.status, letter.attempts) for letter in letters} == {("rejected", 400, 1)}
    assert all("injected bad request" in letter.message for letter in letters)
    assert counters["dead_letters_rejected"] == len(dead_ids)


def test_wrong_token_dead_letters_everything_and_never_shows_the_token(server, datasource, tmp_path, caplog):
    secret = "not-the-right-token-7f3a9c"
    dead_dir = tmp_path / "dlq"
    caplog.set_level(logging.DEBUG)
    # Every logger at DEBUG but one: Beam 2.70's workers log each bundle's operations at DEBUG
    # with a repr that raises for most coders (bytes included), whatever the pipeline; 2.72 fixed it.
    caplog.set_level(logging.INFO, logger="apache_beam.runners.worker.bundle_processor")
    sink = _sink(server, datasource, token=secret, dead_letter_path=str(dead_dir))
    assert secret not in repr(sink) and secret not in str(vars(sink))
    _run(lambda p: p | beam.Create(_events(50), reshuffle=False) | sink)
    letters = dead_letters_in(dead_dir)
    assert len(letters) == 50
    assert {(letter.kind, letter.status) for letter in letters} == {("rejected", 403)}
    assert secret not in caplog.text
    for name in glob.glob(str(dead_dir / "*")):
        with open(name, "rb") as fh:
            assert secret.encode() not in fh.read()


def test_raise_on_failure_fails_the_pipeline_with_data(server, datasource):
    with pytest.raises(Exception) as raised:
        _run(lambda p: p | beam.Create(_events(10), reshuffle=False) | _sink(
            server, datasource, token="wrong-token-value", raise_on_failure=True))
    assert "403" in str(raised.value) and "wrong-token-value" not in str(raised.value)
    assert DeliveryError.__name__ in str(raised.value)


@pytest.mark.parametrize("file_format", ["json", "avro"])
def test_dead_letter_files_are_read_back_and_resent_as_they_are(server, datasource, tmp_path, file_format):
    dead_dir = tmp_path / "dlq"
    _run(lambda p: p | beam.Create(_events(300), reshuffle=False) | _sink(
        server, datasource, token="wrong", dead_letter_path=str(dead_dir), dead_letter_format=file_format))
    assert _ids(server, datasource) == []
    assert all(name.endswith(".avro" if file_format == "avro" else ".jsonl")
               for name in glob.glob(str(dead_dir / "*")))

    def replay(p):
        (p | ReadDeadLetters(str(dead_dir / "*"))
           | beam.Map(lambda letter: letter.line)
           | _sink(server, datasource))

    counters = _run(replay)
    assert counters["rows_acknowledged"] == 300
    assert _ids(server, datasource) == list(range(300))


def test_accounting_under_injected_faults_every_id_is_stored_or_dead_lettered(tmp_path):
    """Random 503/429/500, resets before and after storing, and slow answers.

    From the sink's side every element has exactly one outcome (acknowledged or
    dead-lettered); on the server every id is stored or in the dead letters, and
    an id is stored twice only when a failure came after the server stored it.
    """
    n = 20_000
    datasource = "faults"
    faults = [
        {"status": 503, "when": "before", "probability": 0.15, "seed": 1},
        {"status": 429, "when": "before", "probability": 0.10, "seed": 2, "retry_after_secs": 0.1},
        {"status": 500, "when": "after", "probability": 0.05, "seed": 3},
        {"reset": True, "when": "before", "probability": 0.05, "seed": 4},
        {"reset": True, "when": "after", "probability": 0.05, "seed": 5},
        {"status": 500, "when": "before", "latency_secs": 1.5, "probability": 0.02, "seed": 6},
    ]
    dead_dir = tmp_path / "dlq"
    with LocalServer(data_dir=tmp_path / "server", rate_limit_rps=None, faults=faults) as server:
        counters = _run(lambda p: p | beam.Create(_events(n, pad=100), reshuffle=False) | _sink(
            server, datasource, max_batch_bytes=32 * 1024, read_timeout_secs=1.0, max_in_flight=2,
            retry_policy=RetryPolicy(max_attempts=3, initial_backoff_secs=0.01, max_backoff_secs=0.05,
                                     max_retry_after_secs=0.2),
            dead_letter_path=str(dead_dir)))
        stored = _ids(server, datasource)
        stats = server.stats()
    letters = dead_letters_in(dead_dir)
    dead = [orjson.loads(letter.line)["id"] for letter in letters]
    fired = [rule["fired"] for rule in stats["faults"]]

    # The sink's own books balance exactly.
    assert counters["elements_in"] == n
    assert counters["rows_acknowledged"] + counters["dead_letters"] == n
    assert counters["dead_letters"] == len(letters)
    assert counters.get("retries", 0) > 0
    # Nothing is missing.
    assert set(stored) | set(dead) == set(range(n))
    # Dead letters are only what retries could not deliver, each element once.
    assert len(dead) == len(set(dead))
    assert {letter.kind for letter in letters} <= {"retries_exhausted"}
    # 3 error attempts each; a 429 among them is an attempt too but spends none of the 3 (issue 22).
    assert all(letter.attempts >= 3 for letter in letters)
    # Duplicates come only from failures after the server stored the rows.
    duplicates = len(stored) - len(set(stored))
    dead_but_stored = len(set(dead) & set(stored))
    assert duplicates + dead_but_stored <= stats["rows"]["stored_by_after_faults"]
    # Every kind of fault really happened.
    assert all(count > 0 for count in fired), fired


def test_streaming_pipeline_delivers_every_window(server, datasource, tmp_path):
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import FixedWindows, TimestampedValue

    stream = TestStream().advance_watermark_to(0)
    for second in range(0, 30, 3):
        stream = stream.add_elements(
            [TimestampedValue(event, second) for event in _events(100, start=second * 100)]
        ).advance_processing_time(2)
    stream = stream.advance_watermark_to(40).advance_watermark_to_infinity()
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    dead_dir = tmp_path / "dlq"
    p = beam.Pipeline(options=options)
    (p | stream | "Fixed" >> beam.WindowInto(FixedWindows(10))
       | _sink(server, datasource, max_batch_bytes=16 * 1024, max_buffering_secs=3, clock=lambda: 0.0,
               dead_letter_path=str(dead_dir)))
    p.run().wait_until_finish()
    assert _ids(server, datasource) == sorted(i for s in range(0, 30, 3) for i in range(s * 100, s * 100 + 100))


def test_streaming_dead_letters_are_written_to_windowed_files(server, datasource, tmp_path):
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import FixedWindows, TimestampedValue

    stream = (
        TestStream().advance_watermark_to(0)
        .add_elements([TimestampedValue(e, 5) for e in _events(40)])
        .add_elements([TimestampedValue(e, 75) for e in _events(40, start=40)])
        .advance_watermark_to(200).advance_watermark_to_infinity()
    )
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    dead_dir = tmp_path / "dlq"
    p = beam.Pipeline(options=options)
    (p | stream | "Fixed" >> beam.WindowInto(FixedWindows(10))
       | _sink(server, datasource, token="wrong", clock=lambda: 0.0, dead_letter_path=str(dead_dir)))
    p.run().wait_until_finish()
    names = sorted(os.path.basename(name) for name in glob.glob(str(dead_dir / "*")))
    # Windows of processing time (here: this minute, or two if the run straddles one).
    assert 1 <= len(names) <= 2, names
    assert all(name.startswith("dead-letters-20") and name.endswith(".jsonl") for name in names), names
    letters = dead_letters_in(dead_dir)
    assert sorted(orjson.loads(letter.line)["id"] for letter in letters) == list(range(80))
    assert {letter.window for letter in letters} == {
        "[1970-01-01T00:00:00Z, 1970-01-01T00:00:10Z)", "[1970-01-01T00:01:10Z, 1970-01-01T00:01:20Z)"}


def test_throttling_is_waited_out_reported_to_the_runner_and_dead_lettered_past_its_budget(
        server, datasource, tmp_path):
    # Requests 2-4 get 429 (Retry-After: 1 s), spending no attempt (max_attempts=1):
    # a batch waits 1 s, and is dead-lettered as throttled when another 1 s would
    # pass max_throttled_secs=1.5; from request 6 on every answer is 429.
    server.set_faults([{"datasource": datasource, "status": 429, "when": "before", "sequence": [2, 3, 4],
                        "retry_after_secs": 1, "message": "injected slow down"},
                       {"datasource": datasource, "status": 429, "when": "before",
                        "sequence": list(range(6, 200)), "retry_after_secs": 1, "message": "injected slow down"}])
    policy = RetryPolicy(max_attempts=1, max_throttled_secs=1.5, max_retry_after_secs=1.0)
    dead_dir = tmp_path / "dlq"
    try:
        p = beam.Pipeline(options=PipelineOptions(_RUNNERS["direct"]))
        _ = p | beam.Create(_events(1000), reshuffle=False) | _sink(
            server, datasource, num_shards=1, max_in_flight=1, max_batch_rows=100, retry_policy=policy,
            dead_letter_path=str(dead_dir))
        result = p.run()
        result.wait_until_finish()
    finally:
        server.clear_faults()
    counters = {(c.key.metric.namespace, c.key.metric.name): c.committed
                for c in result.metrics().query(MetricsFilter())["counters"]
                if c.key.metric.namespace in ("tinybird", "beam-throttling-metrics")}
    stored = _ids(server, datasource)
    letters = dead_letters_in(dead_dir)
    dead_ids = sorted(orjson.loads(letter.line)["id"] for letter in letters)
    assert sorted(stored + dead_ids) == list(range(1000))
    assert len(stored) >= 200 and len(dead_ids) >= 100
    # Sent and answered 429, or never sent because the shared pause outlasted the budget.
    assert {letter.kind for letter in letters} == {"throttled"}
    assert {letter.status for letter in letters} <= {429, None}
    assert all("past max_throttled_secs=1.5" in letter.message for letter in letters)
    assert all("injected slow down" in letter.message for letter in letters if letter.status == 429), {letter.message for letter in letters}
    assert counters[("tinybird", "dead_letters_throttled")] == len(dead_ids)
    assert counters[("tinybird", "responses_throttled")] == counters[("tinybird", "responses_4xx")] >= 3
    # At least one 1 s wait after a 429 that was then delivered, in both counters.
    assert counters[("tinybird", "cumulativeThrottlingSeconds")] >= 1
    assert counters[("beam-throttling-metrics", "throttling-msecs")] >= 1000
    assert counters[("tinybird", "cumulativeThrottlingSeconds")] == pytest.approx(
        counters[("beam-throttling-metrics", "throttling-msecs")] / 1000, abs=1)


def test_a_run_without_429_reports_no_throttling(server, datasource):
    # The bounded graph has two posting steps, and with max_in_flight=1 they share
    # one request slot in the process: waiting for it is not throttling.
    p = beam.Pipeline(options=PipelineOptions(_RUNNERS["direct"]))
    _ = p | beam.Create(_events(2000), reshuffle=False) | _sink(
        server, datasource, num_shards=4, max_in_flight=1, max_batch_rows=50)
    result = p.run()
    result.wait_until_finish()
    counters = {(c.key.metric.namespace, c.key.metric.name): c.committed
                for c in result.metrics().query(MetricsFilter())["counters"]
                if c.key.metric.namespace in ("tinybird", "beam-throttling-metrics")}
    assert sorted(_ids(server, datasource)) == list(range(2000))
    assert counters[("tinybird", "rows_acknowledged")] == 2000
    assert counters.get(("tinybird", "responses_throttled"), 0) == 0
    assert counters.get(("tinybird", "cumulativeThrottlingSeconds"), 0) == 0
    assert counters.get(("beam-throttling-metrics", "throttling-msecs"), 0) == 0


def test_the_longest_timeouts_and_budgets_accepted_deliver(server, datasource):
    """Finite timeouts and budgets past what a thread or a socket can wait (1e10 s) passed the
    checks, then every bundle of the post step failed (OverflowError waiting for its send): they
    are refused when built now, and the longest accepted ones deliver."""
    from sinks.tinybird.retry import MAX_WAIT_SECS

    longest = {"connect_timeout_secs": MAX_WAIT_SECS, "read_timeout_secs": MAX_WAIT_SECS}
    policy = {"max_total_secs": MAX_WAIT_SECS, "max_throttled_secs": MAX_WAIT_SECS,
              "max_backoff_secs": MAX_WAIT_SECS, "max_retry_after_secs": MAX_WAIT_SECS}

    def build(p):
        _ = (p | beam.Create(_events(20))
             | WriteToTinybird(datasource=datasource, token=server.token, api_url=server.url, wait=True,
                               retry_policy=policy, **longest))

    counters = _run(build)
    assert counters["rows_acknowledged"] == 20 and "dead_letters" not in counters
    assert sorted(_ids(server, datasource)) == list(range(20))


def test_the_most_shards_accepted_deliver(server, datasource):
    """num_shards past a 64-bit key (2**70, which --num_shards also took) passed the checks, then
    every bundle of the first step failed coding its shard (OverflowError): refused when built
    now, and the most shards accepted deliver."""

    def build(p):
        _ = (p | beam.Create(_events(20))
             | WriteToTinybird(datasource=datasource, token=server.token, api_url=server.url, wait=True,
                               num_shards=2**63))

    counters = _run(build)
    assert counters["rows_acknowledged"] == 20 and "dead_letters" not in counters
    assert sorted(_ids(server, datasource)) == list(range(20))
    with pytest.raises(ValueError, match=r"^num_shards must be at most 2\*\*63"):
        WriteToTinybird(datasource=datasource, num_shards=2**70)
