"""Dynamic destinations (issue 23): one PCollection, a data source per element."""

from __future__ import annotations

import dataclasses
import types
import typing

import apache_beam as beam
import orjson
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import FixedWindows, IntervalWindow, Sessions, TimestampedValue
from shared_testlib import dead_letters_in

from sinks.tinybird import DatasourceFromField, DeadLetterKind, RetryPolicy, WriteToTinybird
from sinks.tinybird._events_api import ClientSettings, EventsApiClient
from sinks.tinybird._routing import _MAX_CHECKED_NAMES, Router, Unroutable
from sinks.tinybird.dead_letters import window_text

_FAST_RETRIES = RetryPolicy(max_attempts=3, initial_backoff_secs=0.01, max_backoff_secs=0.05, max_total_secs=20,
                            max_retry_after_secs=0.2)
_TYPES = ("click", "view", "purchase")


def _run(build, *options: str) -> tuple[dict, dict]:
    """Runs a pipeline; returns the ``tinybird`` counters and the per-data-source ones by (namespace, name)."""
    p = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner", *options]))
    build(p)
    result = p.run()
    result.wait_until_finish()
    totals: dict = {}
    per_source: dict = {}
    for counter in result.metrics().query(MetricsFilter())["counters"]:
        namespace, name = counter.key.metric.namespace, counter.key.metric.name
        if namespace == "tinybird":
            totals[name] = totals.get(name, 0) + counter.committed
        elif namespace.startswith("tinybird/"):
            key = (namespace.removeprefix("tinybird/"), name)
            per_source[key] = per_source.get(key, 0) + counter.committed
    return totals, per_source


def _rows(server, datasource: str) -> list[dict]:
    server.flush()
    if datasource not in server.datasources():
        return []
    return server.query(f"SELECT id, type FROM {datasource} ORDER BY id")


def _sink(server, datasource, **overrides) -> WriteToTinybird:
    settings = dict(datasource=datasource, token=server.token, api_url=server.url, retry_policy=_FAST_RETRIES,
                    max_batch_bytes=64 * 1024, num_shards=2, read_timeout_secs=10)
    settings.update(overrides)
    return WriteToTinybird(**settings)


def _route(prefix: str):
    # A plain lambda, as a user writes it: pickled to the workers with the pipeline.
    return lambda e: f"{prefix}_{e['type']}"


def test_three_types_in_fixed_windows_each_data_source_holds_exactly_its_rows(server, datasource, tmp_path):
    """The issue's must-show: 15,000 rows of three types, 100 routed to an invalid name, 100 whose
    function raises: each data source holds its 5,000 rows once, 200 dead letters with reasons."""
    events = [{"id": i, "type": _TYPES[i % 3], "pad": "x" * 100} for i in range(15_000)]
    invalid = [{"id": 100_000 + i, "type": "not-a-name", "pad": ""} for i in range(100)]
    raising = [{"id": 200_000 + i, "pad": ""} for i in range(100)]  # no "type": the function raises KeyError
    dead_dir = tmp_path / "dlq"

    def timestamped(rows):
        return [TimestampedValue(e, (e["id"] % 15_000) // 100) for e in rows]

    def build(p):
        (p | beam.Create(timestamped(events + invalid + raising), reshuffle=False)
           | beam.WindowInto(FixedWindows(60))
           | _sink(server, _route(datasource), dead_letter_path=str(dead_dir) + "/"))

    totals, per_source = _run(build)

    for kind in _TYPES:
        rows = _rows(server, f"{datasource}_{kind}")
        assert [r["id"] for r in rows] == [e["id"] for e in events if e["type"] == kind]  # each once, in full
        assert {r["type"] for r in rows} == {kind}  # no foreign rows
        assert per_source[(f"{datasource}_{kind}", "rows_acknowledged")] == 5000
    letters = dead_letters_in(dead_dir)
    assert len(letters) == 200 and totals["dead_letters"] == 200 == totals["dead_letters_unroutable"]
    assert {letter.kind for letter in letters} == {DeadLetterKind.UNROUTABLE.value}
    by_id = {orjson.loads(letter.line)["id"]: letter for letter in letters}
    assert sorted(by_id) == [e["id"] for e in invalid + raising]
    for e in invalid + raising:
        # Each in its element's window (issue 21), with the exact line a replay would send.
        start = (e["id"] % 15_000) // 100 // 60 * 60
        assert by_id[e["id"]].window == window_text(IntervalWindow(start, start + 60))
        assert by_id[e["id"]].line == orjson.dumps(e).decode()
    for e in invalid:
        letter = by_id[e["id"]]
        assert letter.datasource == f"{datasource}_not-a-name"
        assert letter.message == (f"the datasource function's result must match [A-Za-z_][A-Za-z0-9_]{{0,99}}, "
                                  f"got '{datasource}_not-a-name'")
    for e in raising:
        letter = by_id[e["id"]]
        assert (letter.datasource, letter.message) == ("", "the datasource function raised KeyError: 'type'")
    assert totals["rows_acknowledged"] == 15_000

    # At most twice the requests that one data source per window needs: the same rows, one data source.
    single_totals, _ = _run(lambda p: (
        p | beam.Create(timestamped(events), reshuffle=False) | beam.WindowInto(FixedWindows(60))
        | _sink(server, f"{datasource}_all")))
    assert len(_rows(server, f"{datasource}_all")) == 15_000
    assert single_totals["requests"] <= totals["requests"] <= 2 * single_totals["requests"], (
        totals["requests"], single_totals["requests"])


def test_a_request_never_mixes_data_sources_and_dead_letters_name_theirs(server, datasource, tmp_path):
    """One data source refuses everything (403): its rows, and only its, are dead-lettered, naming it."""
    refused = f"{datasource}_view"
    server.set_faults([{"status": 403, "datasource": refused, "message": "no scope"}])
    events = [{"id": i, "type": _TYPES[i % 3]} for i in range(3000)]
    dead_dir = tmp_path / "dlq"
    totals, per_source = _run(lambda p: (
        p | beam.Create(events, reshuffle=False)
        | _sink(server, DatasourceFromField("type", prefix=f"{datasource}_"), max_batch_bytes=4096,
                dead_letter_path=str(dead_dir) + "/")))
    letters = dead_letters_in(dead_dir)
    assert sorted(orjson.loads(letter.line)["id"] for letter in letters) == [e["id"] for e in events
                                                                             if e["type"] == "view"]
    assert {(letter.datasource, letter.kind, letter.status) for letter in letters} == {(refused, "rejected", 403)}
    for kind in ("click", "purchase"):
        assert [r["id"] for r in _rows(server, f"{datasource}_{kind}")] == [
            e["id"] for e in events if e["type"] == kind]
    assert per_source[(refused, "dead_letters")] == 1000 == totals["dead_letters_rejected"]
    assert (refused, "rows_acknowledged") not in per_source
    assert per_source[(f"{datasource}_click", "rows_acknowledged")] == 1000


_FILLERS = 3000
_INVALID_NAMES = 50


def _hostile_for_routing(i: int) -> dict:
    """Made next to the sink: a lone surrogate crosses no Beam coder, and Beam samples the first
    elements of a step (by encoding them) to estimate sizes, hence the fillers first."""
    if i < _FILLERS:
        return {"id": i, "type": "click"}
    i -= _FILLERS
    if i < _INVALID_NAMES:
        return {"id": _FILLERS + i, "type": f"bad-{i}"}  # each a name of its own, none valid
    return [
        {"id": 10_000, "type": "a\udcffb"},  # a name holding a lone surrogate
        {"id": 10_001, "type": "click", "name\udcff": object()},  # routed; its reason quotes the key
        {"id": 10_002, "type": "raise"},  # the function raises, its message holds a lone surrogate
        {"id": 10_003, "type": "opaque"},  # the function returns an object whose type hides its name
    ][i - _INVALID_NAMES]


def _route_hostile(prefix: str):
    def route(element):
        if element["type"] == "raise":
            raise LookupError(f"no route for \udcff{element['id']}")
        if element["type"] == "opaque":
            return _Opaque()
        return f"{prefix}_{element['type']}"
    return route


@pytest.mark.parametrize("dead_letter_format", ["json", "avro"])
def test_names_no_data_source_can_have_are_dead_lettered_counted_under_none_and_written(
        server, datasource, tmp_path, dead_letter_format):
    """Surrogates in a name, a key or an exception message, invalid names by the dozen, a type that
    hides its name: each element is stored or dead-lettered with its reason (escaped), the files are
    written, no counter namespace is made for a name that is not a data source, the pipeline succeeds."""
    dead_dir = tmp_path / "dlq"
    count = _FILLERS + _INVALID_NAMES + 4
    totals, per_source = _run(lambda p: (
        p | beam.Create(list(range(count)), reshuffle=False)
        | beam.Map(_hostile_for_routing)
        | _sink(server, _route_hostile(datasource), dead_letter_path=str(dead_dir) + "/",
                dead_letter_format=dead_letter_format)))

    click = f"{datasource}_click"
    assert [r["id"] for r in _rows(server, click)] == list(range(_FILLERS))
    letters = dead_letters_in(dead_dir)
    assert len(letters) == count - _FILLERS
    invalid = sorted((letter for letter in letters if letter.datasource.startswith(f"{datasource}_bad-")),
                     key=lambda letter: int(letter.datasource.rsplit("-", 1)[1]))
    assert [(letter.datasource, letter.kind, letter.line) for letter in invalid] == [
        (f"{datasource}_bad-{i}", "unroutable", f'{{"id":{_FILLERS + i},"type":"bad-{i}"}}')
        for i in range(_INVALID_NAMES)]
    rest = sorted(((letter.datasource, letter.kind, letter.message, letter.line) for letter in letters
                   if letter not in invalid), key=lambda fields: fields[2])
    assert rest == sorted([
        (f"{datasource}_a\\udcffb", "unroutable", "the datasource function's result must match "
         f"[A-Za-z_][A-Za-z0-9_]{{0,99}}, got '{datasource}_a\\udcffb'", None),
        (click, "unencodable", "Type is not JSON serializable: object (at $.name\\udcff)", None),
        ("", "unroutable", "the datasource function raised LookupError: no route for \\udcff10002",
         '{"id":10002,"type":"raise"}'),
        ("", "unroutable", "the datasource function's result must be a str, got test_destinations._Opaque "
         "<unrepresentable test_destinations._Opaque>", '{"id":10003,"type":"opaque"}'),
    ], key=lambda fields: fields[2])
    assert next(letter.element for letter in letters if letter.kind == "unencodable").startswith(
        "{'id': 10001, 'name\\udcff': <object object at")

    assert totals["elements_in"] == count
    assert totals["rows_acknowledged"] == _FILLERS
    assert totals["dead_letters"] == count - _FILLERS
    assert totals["dead_letters_unroutable"] == count - _FILLERS - 1
    assert totals["dead_letters_unencodable"] == 1
    # Per data source: only the one data source there is (an unroutable element counts under none).
    assert per_source == {(click, "rows_acknowledged"): _FILLERS, (click, "dead_letters"): 1}


def test_streaming_routes_each_element_with_state_per_data_source(server, datasource):
    """Unbounded input (TestStream): late and on-time rows of three types, each data source exactly its rows."""
    stream = TestStream().advance_watermark_to(0)
    for start in range(0, 600, 20):  # 30 bundles of 20 rows (a bundle per row costs the DirectRunner 30 s)
        stream = stream.add_elements([TimestampedValue({"id": i, "type": _TYPES[i % 3]}, i % 120)
                                      for i in range(start, start + 20)])
        if start % 200 == 180:
            stream = stream.advance_watermark_to((start // 200 + 1) * 60)
    stream = stream.add_elements([TimestampedValue({"id": 600, "type": "click"}, 1)])  # late: sent, not dropped
    stream = stream.advance_watermark_to_infinity()
    options = PipelineOptions([])  # the DirectRunner: the FnApiRunner does not run TestStream
    options.view_as(StandardOptions).streaming = True
    p = beam.Pipeline(options=options)
    _ = (p | stream | beam.WindowInto(FixedWindows(60))
         | _sink(server, DatasourceFromField("type", prefix=f"{datasource}_"), clock=lambda: 0.0))
    p.run().wait_until_finish()
    for kind in _TYPES:
        expected = [i for i in range(601) if (_TYPES[i % 3] if i < 600 else "click") == kind]
        assert [r["id"] for r in _rows(server, f"{datasource}_{kind}")] == expected


def test_sessions_of_two_data_sources_are_merged_apart(server, datasource):
    """Merging windows with routing: a session per data source, each row once, a handful of requests."""
    events = [TimestampedValue({"id": i, "type": _TYPES[i % 2]}, i) for i in range(400)]  # one session each
    totals, _ = _run(lambda p: (
        p | beam.Create(events, reshuffle=False) | beam.WindowInto(Sessions(10))
        | _sink(server, DatasourceFromField("type", prefix=f"{datasource}_"))))
    for kind in _TYPES[:2]:
        assert [r["id"] for r in _rows(server, f"{datasource}_{kind}")] == list(range(_TYPES.index(kind), 400, 2))
    assert totals["requests"] <= 2 * 2  # per data source: one session, at most one request per shard


# -- the routing function ---------------------------------------------------------------------


class _Named(typing.NamedTuple):
    id: int
    type: str


@dataclasses.dataclass
class _Event:
    id: int
    type: str


@pytest.mark.parametrize("element", [
    {"id": 1, "type": "click"}, beam.Row(id=1, type="click"), _Named(1, "click"), _Event(1, "click"),
    '{"id": 1, "type": "click"}', b'{"type": "click", "id": 1}', bytearray(b'{"type":"click"}'),
])
def test_datasource_from_field_reads_every_element_form_the_sink_encodes(element):
    assert DatasourceFromField("type", prefix="ev_")(element) == "ev_click"


@pytest.mark.parametrize(("element", "message"), [
    ({"id": 1}, "the datasource function raised KeyError: 'type'"),
    ({"type": 7}, "the datasource function raised TypeError: field 'type' holds int 7, not a str"),
    ('[1, 2]', "the datasource function raised TypeError: the element's JSON is list, not an object"),
    ("not json", "the datasource function raised orjson.JSONDecodeError: "),
    (42, "the datasource function raised TypeError: cannot read field 'type' of int"),
    ({"type": "bad name"}, "the datasource function's result must match [A-Za-z_][A-Za-z0-9_]{0,99}, "
                           "got 'ev_bad name'"),
    ({"type": "x_quarantine"}, "the datasource function's result must not name a quarantine data source (the "
                               "server fills it, nothing can be appended to it), got 'ev_x_quarantine'"),
    ({"type": "a" * 98}, "the datasource function's result must match [A-Za-z_][A-Za-z0-9_]{0,99}, got 'ev_"),
])
def test_an_element_without_a_valid_name_is_unroutable_with_the_reason(element, message):
    routed = Router(DatasourceFromField("type", prefix="ev_")).route(element)
    assert isinstance(routed, Unroutable) and routed.message.startswith(message), routed


class _Text(str):
    pass


@pytest.mark.parametrize("prefix", ["", "ev_"])
@pytest.mark.parametrize("element", [
    {"id": 1, "type": ""}, {"id": 1, "type": _Text("")}, types.MappingProxyType({"id": 1, "type": ""}), beam.Row(id=1, type=""),
    _Named(1, ""), _Event(1, ""), '{"id": 1, "type": ""}', b'{"type": "", "id": 1}',
])
def test_an_empty_field_names_no_data_source_whatever_the_prefix(element, prefix):
    """An empty field is no name: not the prefix alone (a data source ``ev_`` that no row named)."""
    router = Router(DatasourceFromField("type", prefix=prefix))
    for _ in range(2):  # the second time, past the router's cache of names
        assert router.route(element) == Unroutable(
            "the datasource function raised ValueError: field 'type' is empty: it names no data source", "")
    assert router.route({"type": "click"}) == f"{prefix}click"


class _Name(str):
    def __str__(self):
        return "overridden"


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no text")


class _HidesItsName(type):
    @property
    def __name__(cls):
        raise RuntimeError("no name")


class _Opaque(metaclass=_HidesItsName):
    pass


class _OpaqueError(Exception, metaclass=type("_HidesItsErrorName", (type,), {"__name__": property(lambda c: 1 / 0)})):
    pass


class _ClassRaises:
    @property
    def __class__(self):
        raise RuntimeError("no class today")

    def __repr__(self):
        return "<class raises>"


def _raise(error: Exception):
    raise error


@pytest.mark.parametrize(("function", "expected"), [
    (lambda e: 42, Unroutable("the datasource function's result must be a str, got int 42", "")),
    (lambda e: None, Unroutable("the datasource function's result must be a str, got NoneType None", "")),
    (lambda e: b"events", Unroutable("the datasource function's result must be a str, got bytes b'events'", "")),
    (lambda e: 1 / 0, Unroutable("the datasource function raised ZeroDivisionError: division by zero", "")),
    (lambda e: (_ for _ in ()).throw(_Unprintable()), Unroutable("the datasource function raised test_destinations._Unprintable", "")),
    # Types that hide their names, and an object whose __class__ raises: a reason, never an exception.
    (lambda e: _Opaque(), Unroutable("the datasource function's result must be a str, got test_destinations._Opaque "
                                     "<unrepresentable test_destinations._Opaque>", "")),
    (lambda e: _raise(_OpaqueError("x")), Unroutable("the datasource function raised test_destinations._OpaqueError: x",
                                                     "")),
    (lambda e: _ClassRaises(), Unroutable("the datasource function's result must be a str, got "
                                          "test_destinations._ClassRaises <class raises>", "")),
    # A lone surrogate is quoted escaped (repr); the name itself is kept (the dead letter escapes it).
    (lambda e: "ev_a\udcffb", Unroutable("the datasource function's result must match [A-Za-z_][A-Za-z0-9_]{0,99}, "
                                        "got 'ev_a\\udcffb'", "ev_a\udcffb")),
    (lambda e: "events", "events"),
    # A str subclass (an enum's value, a library's name type) is its text.
    (lambda e: _Name("events"), "events"),
    (lambda e: _Name("bad name"), Unroutable("the datasource function's result must match "
                                             "[A-Za-z_][A-Za-z0-9_]{0,99}, got 'bad name'", "bad name")),
])
def test_whatever_the_function_does_the_router_answers_a_name_or_a_reason(function, expected):
    assert Router(function).route({"id": 1}) == expected


def test_the_router_checks_each_name_once_and_its_memory_is_bounded(monkeypatch):
    from sinks.tinybird import _routing

    checks: list[object] = []
    check = _routing.datasource_name_problem

    def counted(name):
        checks.append(name)
        return check(name)

    monkeypatch.setattr(_routing, "datasource_name_problem", counted)
    router = Router(lambda e: f"ev_{e}")
    for _ in range(3):
        for i in range(10):
            assert router.route(i) == f"ev_{i}"
    assert len(checks) == 10
    for i in range(_MAX_CHECKED_NAMES * 2 + 5):
        assert router.route(i) == f"ev_{i}"
    assert len(router._routes) <= _MAX_CHECKED_NAMES


class _Callable:
    """A callable object (its class defines ``__call__``): the router calls its bound ``__call__``."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, element):
        self.calls += 1
        return f"ev_{element['type']}"


def test_a_callable_object_is_called_once_per_element_as_itself():
    function = _Callable()
    function.__call__ = lambda element: "not_what_calling_the_object_calls"
    router = Router(function)
    assert [router.route({"type": t}) for t in _TYPES] == [f"ev_{t}" for t in _TYPES]
    assert function.calls == 3


@pytest.mark.parametrize(("datasource", "error", "message"), [
    ("bad name", ValueError, r"^datasource must match"),
    (7, TypeError, r"^datasource must be a str or a callable"),
    (None, TypeError, r"^datasource must be a str or a callable"),
])
def test_the_transform_takes_a_name_or_a_callable(datasource, error, message):
    with pytest.raises(error, match=message):
        WriteToTinybird(datasource=datasource, token="t")
    assert WriteToTinybird(datasource=DatasourceFromField("type"), token="t") is not None


@pytest.mark.parametrize(("field", "prefix"), [("", ""), (None, ""), ("type", None)])
def test_datasource_from_field_is_validated(field, prefix):
    with pytest.raises(ValueError):
        DatasourceFromField(field, prefix=prefix)


# -- the client -------------------------------------------------------------------------------


def test_one_client_posts_to_each_named_data_source_paced_by_its_own_limiter(server, datasource):
    client = EventsApiClient(ClientSettings(api_url=server.url, compression=None), token=server.token,
                             retry_policy=_FAST_RETRIES)
    try:
        for kind in _TYPES:
            report = client.send(orjson.dumps({"id": 1, "type": kind}) + b"\n", 1, f"{datasource}_{kind}")
            assert [part.rows for part in report.delivered] == [1]
        assert len({id(client.limiter(f"{datasource}_{kind}")) for kind in _TYPES}) == 3
        with pytest.raises(ValueError, match="send needs a datasource"):
            client.send(b'{"id":1}\n', 1)
        with pytest.raises(ValueError, match=r"^datasource must match"):
            client.send(b'{"id":1}\n', 1, "x&wait=true")
    finally:
        client.close()
    for kind in _TYPES:
        assert _rows(server, f"{datasource}_{kind}") == [{"id": 1, "type": kind}]


# -- the in-bundle step, driven directly ---------------------------------------------------------


def _nasty_route(element):
    """Every kind of answer a datasource function gives, by the element's ``to``."""
    to = element["to"]
    if to == "raise":
        raise LookupError(f"no route for {element['id']}")
    if to == "int":
        return 7
    if to == "list":
        return ["ev_a"]  # unhashable
    if to == "subclass":
        return _Name("ev_a")  # a str subclass: its text, "ev_a"
    if to == "opaque":
        return _Opaque()  # its type hides its name
    if to == "opaque_raise":
        raise _OpaqueError(f"no route for {element['id']}")
    if to == "surrogate":
        return "ev_\udcff"
    return to


def _drive(encoder_type, elements, limits, windowfn=None):
    """The encoder's outputs for ``elements`` in one bundle, as (data source, id) per line
    and (data source, kind, message, line) per dead letter."""
    from apache_beam.transforms.core import Windowing
    from apache_beam.transforms.window import GlobalWindow, GlobalWindows
    from apache_beam.utils.timestamp import Timestamp
    from apache_beam.utils.windowed_value import WindowedValue

    from sinks.tinybird._batching import DEAD_LETTERS_TAG, FULL_TAG, Chunk, WindowKey

    windowfn = windowfn or GlobalWindows()
    encoder = encoder_type(datasource=_nasty_route, limits=limits, windowing=Windowing(windowfn))
    encoder.setup()
    encoder.start_bundle()
    outputs = []
    for element in elements:
        outputs += encoder.process(element, wv=WindowedValue(element, Timestamp(element["id"]), (GlobalWindow(),))) or ()
    outputs += list(encoder.finish_bundle())
    lines, letters = [], []
    for out in outputs:
        tag = getattr(out, "tag", None)
        if tag == DEAD_LETTERS_TAG:
            letter, _ = out.value.value
            assert out.value.timestamp == Timestamp(orjson.loads(letter.line)["id"])
            letters.append((letter.datasource, letter.kind, letter.message, letter.line))
            continue
        if tag == FULL_TAG:
            datasource, payload = out.value.value[5], out.value.value[1]
        else:
            key, chunk = out.value
            datasource, payload = WindowKey(*key).datasource, Chunk(*chunk).payload
        lines += [(datasource, orjson.loads(line)["id"]) for line in payload.splitlines()]
    return sorted(lines), sorted(letters)


@pytest.mark.parametrize("seed", range(4))
def test_the_global_window_loop_routes_every_answer_as_the_general_one_does(seed):
    """The bounded global-window encoder routes in a loop of its own (a name with an open buffer is
    not checked again): every answer of the function, in any order, between full and evicted
    buffers, ends as in the general encoder, line for line and dead letter for dead letter."""
    import random

    from sinks.tinybird._batching import BatchLimits, _EncodeAndBatchDoFn, _EncodeAndBatchGlobalRoutedDoFn

    rng = random.Random(seed)
    answers = ["ev_a", "ev_b", "ev_c", "bad name", "x_quarantine", "raise", "int", "list", "subclass", "opaque",
               "opaque_raise", "surrogate"]
    elements = [{"id": i, "to": rng.choice(answers)} for i in range(2000)]
    limits = BatchLimits(max_batch_bytes=rng.choice((200, 5000)), max_batch_rows=rng.choice((4, 1000)),
                         max_buffering_secs=5, num_shards=2, max_windows_per_bundle=rng.choice((1, 2, 20)))
    fast = _drive(_EncodeAndBatchGlobalRoutedDoFn, elements, limits)
    general = _drive(_EncodeAndBatchDoFn, elements, limits)
    assert fast == general
    lines, letters = fast
    routed = {"ev_a": "ev_a", "ev_b": "ev_b", "ev_c": "ev_c", "subclass": "ev_a"}
    assert lines == sorted((routed[e["to"]], e["id"]) for e in elements if e["to"] in routed)
    assert len(letters) == sum(e["to"] not in routed for e in elements)
    assert {(d, k, m.split(",")[0]) for d, k, m, _ in letters} <= {
        ("bad name", "unroutable", "the datasource function's result must match [A-Za-z_][A-Za-z0-9_]{0"),
        ("x_quarantine", "unroutable", "the datasource function's result must not name a quarantine data source "
                                       "(the server fills it"),
        ("", "unroutable", "the datasource function's result must be a str"),
        ("ev_\\udcff", "unroutable", "the datasource function's result must match [A-Za-z_][A-Za-z0-9_]{0"),
    } | {("", "unroutable", f"the datasource function raised {error}: no route for {e['id']}")
         for e in elements for error in ("LookupError", "test_destinations._OpaqueError")}


@pytest.mark.parametrize("seed", range(6))
def test_in_a_bundle_every_line_leaves_once_under_its_data_source_however_buffers_are_evicted(seed):
    """Many data sources, few open buffers, small batches: each line leaves exactly once, with its
    data source, in a full batch or a chunk; never more open buffers than the bound."""
    import random

    from apache_beam.transforms.core import Windowing
    from apache_beam.transforms.window import GlobalWindow, GlobalWindows
    from apache_beam.utils.timestamp import Timestamp
    from apache_beam.utils.windowed_value import WindowedValue

    from sinks.tinybird._batching import FULL_TAG, BatchLimits, Chunk, WindowKey, encoder_for

    rng = random.Random(seed)
    sources = [f"ds_{i}" for i in range(rng.choice((2, 5, 40)))]
    limits = BatchLimits(max_batch_bytes=rng.choice((64, 300, 5000)), max_batch_rows=rng.choice((3, 50, 1000)),
                         max_buffering_secs=5, num_shards=2, max_windows_per_bundle=rng.choice((1, 3, 10)))
    encoder = encoder_for(GlobalWindows(), bounded=True, routed=True)(
        datasource=DatasourceFromField("to"), limits=limits, windowing=Windowing(GlobalWindows()))
    encoder.setup()
    encoder.start_bundle()
    elements = [{"id": i, "to": rng.choice(sources)} for i in range(3000)]
    outputs = []
    for element in elements:
        outputs += encoder.process(element, wv=WindowedValue(element, Timestamp(0), (GlobalWindow(),))) or ()
        assert len(encoder._buffers._buffers) <= limits.max_windows_per_bundle
    outputs += list(encoder.finish_bundle())
    left: list[tuple[str, dict]] = []
    for out in outputs:
        if getattr(out, "tag", None) == FULL_TAG:
            batch = out.value.value
            datasource, payload = batch[5], batch[1]
        else:
            key, chunk = out.value
            datasource, payload = WindowKey(*key).datasource, Chunk(*chunk).payload
        left += [(datasource, orjson.loads(line)) for line in payload.splitlines()]
    assert sorted((d, e["id"]) for d, e in left) == sorted((e["to"], e["id"]) for e in elements)
    assert all(d == e["to"] for d, e in left)
