"""Property-based tests: the batching DoFns and the local server's request parser.

``tests/sink/test_batching.py`` checks ``cut_batches`` alone; here random element
sizes, windows, bundles and limits go through the DoFns of bounded batching,
``_EncodeAndBatchDoFn`` then (after a shuffle, as a GroupByKey may reorder)
``_MergeRemaindersDoFn``, called as a runner would call them.
``tests/emulator/test_emulator_robustness.py`` fuzzes bodies; here the headers
and the query string are random too.
"""

from __future__ import annotations

import collections
import gzip
import random
import urllib.parse

import orjson
import pytest
import requests
import zstandard
from apache_beam.transforms.core import Windowing
from apache_beam.transforms.window import FixedWindows, GlobalWindow, IntervalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sinks.tinybird._batching import (
    DEAD_LETTERS_TAG,
    FULL_TAG,
    Batch,
    BatchLimits,
    Chunk,
    WindowKey,
    _EncodeAndBatchDoFn,
    _MergeRemaindersDoFn,
)
from sinks.tinybird.dead_letters import window_text

pytestmark = pytest.mark.timeout(180)

# One window function's windows (a PCollection has one window coder).
WINDOWS = [IntervalWindow(0, 10), IntervalWindow(10, 20), IntervalWindow(20, 30), IntervalWindow(30, 40)]

_element = st.tuples(st.integers(0, 400), st.integers(0, len(WINDOWS) - 1))  # (pad size, window index)


@settings(max_examples=300, deadline=None)
@given(
    bundles=st.lists(st.lists(_element, max_size=60), min_size=1, max_size=6),
    max_bytes=st.integers(min_value=20, max_value=3000),
    max_rows=st.integers(min_value=1, max_value=40),
    num_shards=st.integers(min_value=1, max_value=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_batching_dofns_respect_limits_keep_every_element_once_and_never_mix_windows(
        bundles, max_bytes, max_rows, num_shards, seed):
    limits = BatchLimits(max_batch_bytes=max_bytes, max_batch_rows=max_rows, max_buffering_secs=1.0,
                         num_shards=num_shards)
    encode = _EncodeAndBatchDoFn(datasource="d", limits=limits, windowing=Windowing(FixedWindows(10)))
    encode.setup()
    batches = []  # (batch, where it came from)
    remainders = collections.defaultdict(list)
    dead, window_of, size_of = [], {}, {}
    next_id = 0
    for bundle in bundles:
        encode.start_bundle()
        for pad, w in bundle:
            element = {"id": next_id, "p": "x" * pad}
            window_of[next_id] = window_text(WINDOWS[w])
            size_of[next_id] = len(orjson.dumps(element)) + 1
            next_id += 1
            # process returns its outputs, or None when nothing leaves; every output is in the global window.
            for out in encode.process(element, wv=WindowedValue(element, Timestamp(w * 10 + 1), (WINDOWS[w],))) or ():
                assert out.value.windows == (GlobalWindow(),)
                if out.tag == FULL_TAG:
                    batches.append((Batch(*out.value.value), "full"))
                else:
                    assert out.tag == DEAD_LETTERS_TAG
                    dead.append(out.value.value[0])
        for windowed in encode.finish_bundle():
            key, chunk = WindowKey(*windowed.value[0]), Chunk(*windowed.value[1])
            # A remainder leaves in the global window; its key says its own window.
            assert windowed.windows == (GlobalWindow(),)
            assert key.window in {window_text(w) for w in WINDOWS}
            assert 0 <= key.shard < num_shards
            assert chunk.rows == chunk.payload.count(b"\n") and chunk.payload.endswith(b"\n")
            remainders[key].append(chunk)

    rng = random.Random(seed)
    merge = _MergeRemaindersDoFn(limits=limits)
    for key, chunks in remainders.items():
        rng.shuffle(chunks)  # a GroupByKey gives no order
        batches += [(Batch(*batch), "merged") for batch in merge.process((key, chunks))]

    seen = collections.Counter()
    for batch, origin in batches:
        assert batch.payload.endswith(b"\n") and batch.rows == batch.payload.count(b"\n") > 0, origin
        assert len(batch.payload) <= max_bytes, (origin, len(batch.payload), max_bytes)
        assert batch.rows <= max_rows, (origin, batch.rows, max_rows)
        ids = [orjson.loads(line)["id"] for line in batch.payload.split(b"\n")[:-1]]
        assert {window_of[i] for i in ids} == {batch.window}, origin  # windows never mixed
        seen.update(ids)
    oversize = {orjson.loads(letter.line)["id"] for letter in dead}
    assert all(letter.kind == "oversize" for letter in dead)
    assert oversize == {i for i, size in size_of.items() if size > max_bytes}
    # Every element in exactly one batch, or (too large alone) in the dead letters.
    assert set(seen) | oversize == set(range(next_id))
    assert set(seen).isdisjoint(oversize) and all(n == 1 for n in seen.values())
    # Full batches leave the bundle as soon as the next line does not fit.
    for batch, origin in batches:
        if origin == "full":
            assert batch.rows == max_rows or len(batch.payload) > max_bytes - max(size_of.values())


# -- the local server's request parser ---------------------------------------------

DOCUMENTED_STATUSES = {200, 202, 400, 403, 413, 429, 503}
_printable = st.characters(min_codepoint=32, max_codepoint=126)
_ndjsonish = st.lists(
    st.text(alphabet='{}[]":,0123456789.-eE \\ntruefalsn', max_size=40), max_size=20,
).map(lambda parts: "\n".join(parts).encode())
_valid_rows = st.lists(
    st.dictionaries(st.sampled_from(["id", "s", "n", "a"]),
                    st.one_of(st.integers(-5, 5), st.text(max_size=5), st.none(), st.lists(st.integers(-2**63, 2**63 - 1), max_size=2))),
    max_size=5,
).map(lambda rows: b"".join(orjson.dumps(r) + b"\n" for r in rows))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(st.binary(max_size=2000), _ndjsonish, _valid_rows),
    compress=st.sampled_from([None, "gzip", "zstd", "gzip-truncated"]),
    encoding=st.one_of(st.none(), st.sampled_from(
        ["gzip", "zstd", "identity", "GZIP", "zstd ", "x-gzip", "br", "deflate", "gzip, zstd", ""]),
        st.text(alphabet=_printable, max_size=15)),
    content_type=st.one_of(st.none(), st.sampled_from(["application/json", "text/plain; charset=latin-1"]),
                           st.text(alphabet=_printable, max_size=20)),
    params=st.lists(st.tuples(
        st.sampled_from(["name", "wait", "format", "token", "name", "x", ""]),
        st.one_of(st.sampled_from(["fuzz", "true", "false", "1", "json", "ndjson", "csv", ""]), st.text(max_size=12)),
    ), max_size=5),
    raw_suffix=st.sampled_from(["", "&%zz", "&name=%ff%fe", "&wait", "&&&", "&name=fuzz&name=other", "#frag"]),
    auth=st.sampled_from(["admin", "none", "garbage", "query", "basic"]),
)
def test_the_server_answers_any_request_with_a_documented_status_and_a_json_body(
        server, body, compress, encoding, content_type, params, raw_suffix, auth):
    if compress == "gzip":
        body = gzip.compress(body)
    elif compress == "zstd":
        body = zstandard.ZstdCompressor().compress(body)
    elif compress == "gzip-truncated":
        body = gzip.compress(body)[:-5]
    headers = {}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    if content_type is not None:
        headers["Content-Type"] = content_type
    query = urllib.parse.urlencode(params) + raw_suffix
    if auth == "admin":
        headers["Authorization"] = f"Bearer {server.token}"
    elif auth == "garbage":
        headers["Authorization"] = "Bearer nope-not-a-token"
    elif auth == "basic":
        headers["Authorization"] = "Basic dXNlcjpwYXNz"
    elif auth == "query":
        query += "&token=" + urllib.parse.quote(server.token)
    # requests refuses to send a header value with leading whitespace.
    headers = {key: value.lstrip() for key, value in headers.items()}
    try:
        response = requests.post(f"{server.url}/v0/events?{query}", data=body, headers=headers, timeout=30)
    except requests.ConnectionError as exc:  # pragma: no cover - would be a bug
        pytest.fail(f"the server dropped the connection: {exc}")
    assert response.status_code in DOCUMENTED_STATUSES, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    answer = response.json()
    if response.status_code >= 400:
        assert list(answer) == ["error"] and isinstance(answer["error"], str) and answer["error"]
    else:
        assert set(answer) == {"successful_rows", "quarantined_rows"}
        assert all(isinstance(v, int) and v >= 0 for v in answer.values())
