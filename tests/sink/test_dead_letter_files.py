"""Dead-letter files of unbounded input: one final file per bundle, never a temporary file left behind."""

from __future__ import annotations

import os

import fastavro
import orjson
import pytest
from apache_beam.utils.timestamp import Timestamp

from sinks.tinybird.dead_letters import DeadLetter, WriteDeadLetterFiles, _WriteBundleFilesDoFn, streaming_file_name


def _letter(i: int) -> DeadLetter:
    return DeadLetter(line=None, element=f"b'bad {i}'", datasource="events", kind="unencodable", status=None,
                      message="invalid JSON", attempts=0, first_attempt_at="2026-12-01T00:00:00.000Z",
                      last_attempt_at="2026-12-01T00:00:00.000Z", window="global")


@pytest.mark.parametrize("file_format", ["json", "avro"])
def test_a_bundle_writes_one_final_file_and_no_temporary_one(tmp_path, file_format):
    writer = _WriteBundleFilesDoFn(path=str(tmp_path) + "/", file_format=file_format, clock=lambda: 1_796_000_000.25)
    writer.setup()
    writer.start_bundle()
    for i in range(3):
        writer.process(_letter(i), timestamp=Timestamp(0))
    # Until the bundle ends, its records are only in a hidden temporary file.
    [temporary] = os.listdir(tmp_path)
    assert temporary.startswith(".in-progress-dead-letters-")
    [result] = list(writer.finish_bundle())
    [name] = os.listdir(tmp_path)
    assert result.value.file_name == str(tmp_path / name)
    suffix = ".jsonl" if file_format == "json" else ".avro"
    # dead-letters-<UTC time of writing, to the millisecond>-<12 random hex digits><suffix>
    assert name.startswith("dead-letters-2026-11-30T005320250Z-") and name.endswith(suffix)
    assert len(name) == len("dead-letters-2026-11-30T005320250Z-") + 12 + len(suffix)
    with open(tmp_path / name, "rb") as fh:
        records = list(fastavro.reader(fh)) if file_format == "avro" else [orjson.loads(line) for line in fh]
    assert [DeadLetter(**r) for r in records] == [_letter(i) for i in range(3)]
    # A bundle without dead letters writes nothing.
    writer.start_bundle()
    assert list(writer.finish_bundle()) == []
    assert os.listdir(tmp_path) == [name]


def test_a_failed_bundle_leaves_no_file_behind(tmp_path):
    """The runner retries a failed bundle (which writes a new file); the failed one's file goes."""
    writer = _WriteBundleFilesDoFn(path=str(tmp_path), file_format="json")
    writer.setup()
    writer.start_bundle()
    writer.process(_letter(1), timestamp=Timestamp(0))
    assert len(os.listdir(tmp_path)) == 1
    writer.teardown()
    assert os.listdir(tmp_path) == []
    # A retried bundle on the same instance: the abandoned file goes when the next bundle starts.
    writer.start_bundle()
    writer.process(_letter(1), timestamp=Timestamp(0))
    writer.start_bundle()
    assert os.listdir(tmp_path) == []


def test_file_names_sort_by_time_and_never_repeat():
    names = {streaming_file_name(1_796_000_000.0, ".jsonl") for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith("dead-letters-2026-11-30T005320000Z-") for n in names)
    assert streaming_file_name(1_796_000_000.0, ".avro") < streaming_file_name(1_796_000_001.0, ".avro")


def test_the_path_and_format_are_checked():
    with pytest.raises(ValueError, match="dead_letter_format"):
        WriteDeadLetterFiles("dlq/", file_format="csv")
    with pytest.raises(ValueError, match="dead_letter_path"):
        WriteDeadLetterFiles(" ")
