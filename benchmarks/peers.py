"""What users write instead of the sink, written the way they write it.

Every peer reads the same events and encodes each with ``orjson.dumps``, as the
sink does, so that the comparison is about batching and HTTP, not JSON
libraries. Each posts NDJSON to ``/v0/events`` without ``wait`` (the server
answers 202, as for the sink) and fails the bundle on an HTTP error, as their
authors do.

(a) :func:`post_each_element`: a DoFn that calls ``requests.post`` per element,
    with no session (one TCP connection per event).
(b) :func:`batch_elements_by_bytes`: ``beam.BatchElements`` bounded by bytes at
    ``max_batch_bytes`` (``element_size_fn``, fixed size), then a new
    ``requests.Session`` per batch.
(c) :func:`group_into_batches`: random keys, ``beam.GroupIntoBatches`` by count
    (per-element state), then a ``requests.Session`` made in ``setup()``.
(d) :func:`tinybird_beam`: the approach of the ``tinybird-beam`` package
    (PyPI, 2021; ``tinybird/beam.py``, ``WriteToTinybirdBatch``):
    ``BatchElements(min_batch_size=1000, max_batch_size=1000)``, and per batch
    a new ``requests.Session`` with a mounted ``HTTPAdapter(max_retries=
    Retry(total=5, backoff_factor=10))``, no timeout, the session never closed,
    any status >= 400 raised. The original writes each batch as CSV with the
    ``csv`` module and posts it as a multipart file to the Data Sources API
    (``/v0/datasources?mode=append``); here it posts the batch as NDJSON to
    ``/v0/events`` so that the server can count the rows.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
import orjson
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from benchmarks._pipelines import bounded_source, stream_chunks, streaming_source, timed_pipeline
from benchmarks.scenarios import RunSpec, Timed

__all__ = [
    "GROUP_INTO_BATCHES_KEYS", "GROUP_INTO_BATCHES_SIZE", "TINYBIRD_BEAM_BATCH_SIZE",
    "batch_elements_by_bytes", "group_into_batches", "group_into_batches_streaming",
    "post_each_element", "tinybird_beam",
]

# tinybird-beam's default batch_size.
TINYBIRD_BEAM_BATCH_SIZE = 1000
# The usual shape of GroupIntoBatches on random keys: a handful of keys, a round count.
GROUP_INTO_BATCHES_KEYS = 10
GROUP_INTO_BATCHES_SIZE = 1000
_TIMEOUT = (5, 30)


def _url(spec: RunSpec) -> str:
    return f"{spec.api_url}/v0/events?name={spec.datasource}"


def _headers(spec: RunSpec) -> dict[str, str]:
    return {"Authorization": f"Bearer {spec.token}"}


# -- (a) one request per element -------------------------------------------------


class _PostEachElementDoFn(beam.DoFn):
    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self._url = url
        self._headers = headers

    def process(self, element: dict[str, Any]) -> None:
        response = requests.post(self._url, data=orjson.dumps(element), headers=self._headers, timeout=_TIMEOUT)
        response.raise_for_status()


def post_each_element(spec: RunSpec) -> Timed:
    def build(p):
        bounded_source(p, spec) | "Post" >> beam.ParDo(_PostEachElementDoFn(_url(spec), _headers(spec)))

    return timed_pipeline(streaming=False, build=build)


# -- (b) BatchElements by bytes, a Session per batch ----------------------------------


def _line_bytes(line: bytes) -> int:
    return len(line) + 1


class _PostBatchNewSessionDoFn(beam.DoFn):
    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self._url = url
        self._headers = headers

    def process(self, batch: list[bytes]) -> None:
        batch.append(b"")
        with requests.Session() as session:
            response = session.post(self._url, data=b"\n".join(batch), headers=self._headers, timeout=_TIMEOUT)
            response.raise_for_status()


def batch_elements_by_bytes(spec: RunSpec) -> Timed:
    def build(p):
        (bounded_source(p, spec)
         | "Encode" >> beam.Map(orjson.dumps)
         | "Batch" >> beam.BatchElements(
             min_batch_size=spec.max_batch_bytes, max_batch_size=spec.max_batch_bytes,
             element_size_fn=_line_bytes)
         | "Post" >> beam.ParDo(_PostBatchNewSessionDoFn(_url(spec), _headers(spec))))

    return timed_pipeline(streaming=False, build=build)


# -- (c) GroupIntoBatches on random keys -------------------------------------------


def _random_key(element: dict[str, Any]) -> tuple[int, bytes]:
    return random.randrange(GROUP_INTO_BATCHES_KEYS), orjson.dumps(element)


class _PostGroupedBatchDoFn(beam.DoFn):
    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self._url = url
        self._headers = headers

    def setup(self) -> None:
        self._session = requests.Session()

    def process(self, keyed_batch: tuple[int, Iterable[bytes]]) -> None:
        lines = list(keyed_batch[1])
        lines.append(b"")
        response = self._session.post(self._url, data=b"\n".join(lines), headers=self._headers, timeout=_TIMEOUT)
        response.raise_for_status()

    def teardown(self) -> None:
        self._session.close()


def _group_and_post(pcoll: beam.PCollection, spec: RunSpec) -> None:
    (pcoll
     | "KeyAndEncode" >> beam.Map(_random_key)
     | "Batch" >> beam.GroupIntoBatches(GROUP_INTO_BATCHES_SIZE)
     | "Post" >> beam.ParDo(_PostGroupedBatchDoFn(_url(spec), _headers(spec))))


def group_into_batches(spec: RunSpec) -> Timed:
    return timed_pipeline(streaming=False, build=lambda p: _group_and_post(bounded_source(p, spec), spec))


def group_into_batches_streaming(spec: RunSpec) -> Timed:
    chunks = stream_chunks(spec)
    return timed_pipeline(
        streaming=True, build=lambda p: _group_and_post(streaming_source(p, chunks, spec.data_path), spec))


# -- (d) the tinybird-beam approach --------------------------------------------------


class _TinybirdBeamInsertDoFn(beam.DoFn):
    """tinybird-beam's ``_Insert``, posting NDJSON to /v0/events instead of CSV."""

    def __init__(self, url: str, token: str) -> None:
        beam.DoFn.__init__(self)
        self.url = url
        self.token = token

    def process(self, element: Iterable[dict[str, Any]]) -> None:
        retry = Retry(total=5, backoff_factor=10)
        adapter = HTTPAdapter(max_retries=retry)
        _session = requests.Session()
        _session.mount("http://", adapter)
        _session.mount("https://", adapter)

        data = b"".join(orjson.dumps(row) + b"\n" for row in element)
        headers = {
            "Authorization": f"Bearer {self.token}",
            "X-TB-Client": "beam-0.1",
        }
        response = _session.post(self.url, headers=headers, data=data)
        ok = response.status_code < 400
        if not ok:
            raise Exception(json.dumps(response.json()))


def tinybird_beam(spec: RunSpec) -> Timed:
    def build(p):
        (bounded_source(p, spec)
         | "Batch" >> beam.BatchElements(
             min_batch_size=TINYBIRD_BEAM_BATCH_SIZE, max_batch_size=TINYBIRD_BEAM_BATCH_SIZE)
         | "Insert" >> beam.ParDo(_TinybirdBeamInsertDoFn(_url(spec), spec.token)))

    return timed_pipeline(streaming=False, build=build)
