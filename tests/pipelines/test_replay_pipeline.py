"""Replay dead letters against a local server: rows the server rejected are resent; overlap is refused."""

from __future__ import annotations

import argparse
import json
import os
import shlex

import apache_beam as beam
import orjson
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from pipelines_testlib import RUNNERS, count, run_quietly, sink_flags
from shared_testlib import dead_letters_in

from pipelines import files_to_tinybird, replay_dead_letters
from pipelines._options import UsageError
from pipelines.replay_dead_letters import check_output_outside_input, input_location
from sinks.tinybird import DeadLetter, WriteToTinybird

_REJECT_FIRST_REQUEST = {"status": 400, "when": "before", "sequence": [1], "message": "injected: bad request"}


def _write_events(path, n: int) -> None:
    lines = [json.dumps({"id": i, "kind": "view", "user": {"id": f"u{i % 7}"}}) for i in range(n)]
    lines.insert(n // 2, '{"id": "broken"')  # cannot be encoded: dead-lettered without a line
    path.write_text("\n".join(lines) + "\n")


def _ids(server, datasource: str) -> list:
    server.flush()
    return [r["id"] for r in server.query(f"SELECT id FROM {datasource} ORDER BY id")]


@pytest.mark.parametrize("runner", ["direct", "multi_processing"])
def test_replay_resends_rejected_rows_and_keeps_only_what_fails_again(server, datasource, runner, tmp_path):
    source = tmp_path / "events.ndjson"
    _write_events(source, 600)
    first_dead, second_dead = tmp_path / "dead-letters", tmp_path / "replayed"

    # First run: the server rejects the first request (100 rows) with a 400.
    server.set_faults([{**_REJECT_FIRST_REQUEST, "datasource": datasource}])
    first, _ = run_quietly(files_to_tinybird.run, sink_flags(
        server, datasource, "--input", str(source), "--max_batch_rows", "100", "--num_shards", "1",
        "--dead_letter_path", f"{first_dead}/", *RUNNERS[runner]))
    rejected = [d for d in dead_letters_in(first_dead) if d.kind == "rejected"]
    unencodable = [d for d in dead_letters_in(first_dead) if d.kind == "unencodable"]
    assert len(rejected) == 100 and len(unencodable) == 1
    assert all(d.status == 400 and d.message.endswith("injected: bad request") for d in rejected)
    assert first.rows_read == 601 and first.dead_letters == 101
    rejected_ids = sorted(json.loads(d.line)["id"] for d in rejected)
    assert _ids(server, datasource) == sorted(set(range(600)) - set(rejected_ids))

    # Replay: the first replay request (50 rows) is rejected again; the rest goes through.
    server.set_faults([{**_REJECT_FIRST_REQUEST, "datasource": datasource}])
    second, printed = run_quietly(replay_dead_letters.run, sink_flags(
        server, datasource, "--input", f"{first_dead}/*", "--max_batch_rows", "50", "--num_shards", "1",
        "--dead_letter_path", f"{second_dead}/", *RUNNERS[runner]))

    still = dead_letters_in(second_dead)
    failed_again = [d for d in still if d.kind == "rejected"]
    carried = [d for d in still if d.kind == "unencodable"]
    assert len(failed_again) == 50 and carried == unencodable  # carried over unchanged
    assert {d.line for d in failed_again} <= {d.line for d in rejected}
    failed_again_ids = sorted(json.loads(d.line)["id"] for d in failed_again)
    assert _ids(server, datasource) == sorted(set(range(600)) - set(failed_again_ids))  # no duplicates
    assert second.rows_read == 101 and second.rows_acknowledged == 50
    assert second.dead_letters == 51
    assert second.dead_letters_by_kind == {"rejected": 50, "unreplayable": 1}
    assert "dead letters                 51   (rejected: 50, unreplayable: 1)" in printed
    # Judged on the lines resent (50 of 100 failed again); the unreplayable record counts on neither side.
    assert second.failure == ("50 of 100 rows read were dead-lettered (50.00%), more than --max_dead_letter_ratio "
                              "0.01 (1.00%) (1 unreplayable records, carried over, are not counted)")
    # The input was left as it was.
    assert sorted(dead_letters_in(first_dead), key=repr) == sorted(rejected + unencodable, key=repr)


def test_replay_reads_avro_dead_letters(server, datasource, tmp_path):
    source = tmp_path / "events.ndjson"
    _write_events(source, 40)
    server.set_faults([{**_REJECT_FIRST_REQUEST, "datasource": datasource}])
    run_quietly(files_to_tinybird.run, sink_flags(
        server, datasource, "--input", str(source), "--max_batch_rows", "10", "--num_shards", "1",
        "--dead_letter_path", str(tmp_path / "avro"), "--dead_letter_format", "avro"))
    assert [p.suffix for p in (tmp_path / "avro").glob("dead-letters*")] == [".avro"]
    assert count(server, datasource) == 30
    server.clear_faults()

    summary, _ = run_quietly(replay_dead_letters.run, sink_flags(
        server, datasource, "--input", str(tmp_path / "avro" / "*.avro"),
        "--dead_letter_path", str(tmp_path / "replayed")))

    assert _ids(server, datasource) == list(range(40))
    (carried,) = dead_letters_in(tmp_path / "replayed")
    assert carried.kind == "unencodable" and carried.line is None and '"broken"' in carried.element
    assert summary.rows_acknowledged == 10 and summary.dead_letters == 1


@pytest.mark.parametrize("pattern, output", [
    ("dl/*", "dl"),
    ("dl/*", "dl/"),
    ("dl/*.jsonl", "dl/again/"),
    ("dl/sub/*", "dl/"),
    ("./dl//*", "dl/./"),
    ("dl/dead-letters-00000-of-00001.jsonl", "dl"),
    ("dl", "dl/new"),
    ("*.jsonl", "replayed/"),
    ("gs://bucket/dl/*", "gs://bucket/dl/new/"),
    ("gs://bucket/dl/*", "gs://bucket/"),
    ("gs://bucket/dl/run-*/x.avro", "gs://bucket//dl"),
    # Inside the input's folder, where its pattern may read.
    ("gs://bucket/dead-letters-x-*", "gs://bucket/dead-letters-x-2/"),
    ("gs://bucket/dl-*", "gs://bucket/dl-replayed/"),
    ("gs://bucket*", "gs://bucket/replayed/"),
    ("dl/dead-letters-x-*", "dl/dead-letters-x-again/"),
    ("dl/dead-letters-x-*", "dl/dead-letters-x-"),
])
def test_an_output_overlapping_the_input_is_refused(tmp_path, monkeypatch, pattern, output):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dl").mkdir()
    with pytest.raises(UsageError, match="overlaps the input location"):
        check_output_outside_input(pattern, output)


@pytest.mark.parametrize("pattern, output", [
    ("dl/*", "dl-replayed/"),
    ("dl/*", "../elsewhere/"),
    ("dl/sub/*", "dl/other/"),
    ("gs://bucket/dl/*", "gs://bucket/dl-replayed/"),
    ("gs://bucket/dl/*", "gs://other-bucket/dl/"),
    ("dl/*", "gs://bucket/dl/"),
    # Inside the input's folder, where its pattern cannot read: a run's files at a bucket's root.
    ("gs://bucket/dead-letters-x-*", "gs://bucket/replayed/"),
    ("s3://bucket/dead-letters*", "s3://bucket/replayed/"),
    ("dl/dead-letters-x-*", "dl/replayed/"),
])
def test_an_output_outside_the_input_is_accepted(tmp_path, monkeypatch, pattern, output):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dl" / "sub").mkdir(parents=True)
    check_output_outside_input(pattern, output)


def test_input_location_is_the_folder_read_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dl").mkdir()
    assert input_location("dl/*") == str(tmp_path / "dl")
    assert input_location("dl") == str(tmp_path / "dl")
    assert input_location("dl/a.jsonl") == str(tmp_path / "dl")
    assert input_location("gs://b/x/y-*/z") == "gs://b/x"


def test_replay_refuses_before_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dead-letters").mkdir()
    (tmp_path / "dead-letters" / "dead-letters-00000-of-00001.jsonl").write_text("")
    with pytest.raises(UsageError, match="overlaps the input location"):
        replay_dead_letters.run(["--input", "dead-letters/*", "--dead_letter_path", "dead-letters/replayed/"])
    with pytest.raises(UsageError, match="--dead_letter_path is required"):
        replay_dead_letters.run(["--input", "dead-letters/*"])
    with pytest.raises(UsageError, match="--input is required"):
        replay_dead_letters.run(["--dead_letter_path", "new/"])
    with pytest.raises(UsageError, match="no file matches"):
        replay_dead_letters.run(["--input", "nothing/*", "--dead_letter_path", "new/"])
    # Nothing started, nothing written.
    assert sorted(os.listdir(tmp_path)) == ["dead-letters"]
    assert os.listdir(tmp_path / "dead-letters") == ["dead-letters-00000-of-00001.jsonl"]


def test_replay_exits_with_status_2_on_overlap(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dl").mkdir()
    with pytest.raises(SystemExit) as exited:
        replay_dead_letters.main(["--input", "dl/*", "--dead_letter_path", "dl"])
    assert exited.value.code == 2
    assert "error: --dead_letter_path 'dl' overlaps the input location" in capsys.readouterr().err


def test_the_replays_help_says_what_it_does_without_datasource():
    """Its --datasource is optional: without it each line goes back to its record's data source."""
    parser = argparse.ArgumentParser()
    replay_dead_letters.ReplayDeadLettersOptions._add_argparse_args(parser)  # pylint: disable=protected-access
    (action,) = [a for a in parser._actions if "--datasource" in a.option_strings]  # pylint: disable=protected-access
    assert action.default is None
    assert "--datasource_field" not in action.help
    assert "default 'events'" not in action.help
    assert "the data source its dead-letter record names" in action.help


# -- a data source per record ---------------------------------------------------------------

def _letter(line: str | None, datasource: str, kind: str = "rejected") -> DeadLetter:
    return DeadLetter(line=line, element=None if line is not None else "{'broken'", datasource=datasource,
                      kind=kind, status=400 if kind == "rejected" else None, message="m", attempts=1,
                      first_attempt_at="2024-05-01T00:00:00.000Z", last_attempt_at="2024-05-01T00:00:00.000Z",
                      window="global")


def _write_letters(path, letters) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(letter._asdict()) + b"\n" for letter in letters))


# Spacing, key order, a wide integer and an escaped character that a JSON round trip would change.
_ODD_LINE = '{"id": 1,  "z":1.10, "big": 123456789012345678901234567890, "s":"\\u00e9"}'


@pytest.mark.parametrize("runner", ["FnApiRunner", "BundleBasedDirectRunner"])
def test_routed_lines_keep_their_bytes_and_data_source_across_a_fusion_break(runner):
    letters = [_letter(_ODD_LINE, "ev_a"), _letter('{"id":2}', "ev_b"), _letter('{"id":3}', ""),
               _letter(None, "ev_a", kind="unencodable")]
    with beam.Pipeline(runner=runner) as p:
        split = replay_dead_letters.split_replayable(p | beam.Create(letters))
        seen = (split.lines
                | beam.Reshuffle()
                | beam.Map(lambda line: (type(line).__name__, bytes(line), line.datasource)))
        assert_that(seen, equal_to([("_RoutedLine", _ODD_LINE.encode(), "ev_a"), ("_RoutedLine", b'{"id":2}', "ev_b"),
                                    ("_RoutedLine", b'{"id":3}', "")]), label="lines")
        assert_that(split.unreplayable | beam.Map(lambda d: d.kind), equal_to(["unencodable"]), label="unreplayable")


@pytest.mark.parametrize("runner", ["FnApiRunner", "BundleBasedDirectRunner"])
def test_the_sink_routes_replayed_lines_by_record_after_a_reshuffle(server, datasource, runner):
    names = [f"{datasource}_a", f"{datasource}_b"]
    letters = [_letter(orjson.dumps({"id": i, "dest": names[i % 2]}).decode(), names[i % 2]) for i in range(40)]
    with beam.Pipeline(runner=runner) as p:
        lines = replay_dead_letters.split_replayable(p | beam.Create(letters)).lines
        result = lines | beam.Reshuffle() | WriteToTinybird(
            datasource=replay_dead_letters.record_datasource, token=server.token, api_url=server.url,
            wait=True, num_shards=2)
        assert_that(result.dead_letters, equal_to([]))
    server.flush()
    for name in names:
        stored = server.query(f"SELECT id, dest FROM {name} ORDER BY id")
        assert stored == [{"id": i, "dest": name} for i in range(40) if names[i % 2] == name]


def test_replay_sends_each_line_to_the_data_source_its_record_names(server, datasource, tmp_path):
    """Without --datasource, lines go back to their records' data sources, byte for byte; with it, all to one."""
    names = {t: f"{datasource}_{t}" for t in ("a", "b", "c")}
    letters = [_letter(orjson.dumps({"id": i, "t": t, "at": "2024-05-01 08:00:00"}).decode(), names[t])
               for i, t in enumerate("abc" * 10)]
    # Quarantined by the server (month 13 in a DateTime column).
    odd = '{"t": "c",  "id":  1000, "at":"2024-13-01 08:00:00"}'
    no_name = [_letter('{"id": 2000, "t": 7}', "", kind="unroutable"),
               _letter('{"id": 2001}', "", kind="unroutable")]
    bad_name = _letter('{"id": 2002, "t": "bad-name"}', f"{datasource}_bad-name", kind="unroutable")
    # The data sources exist first, with a DateTime column: a first run sends one row to each.
    _write_letters(tmp_path / "first" / "dead-letters-1.jsonl", letters[:3])
    run_quietly(replay_dead_letters.run, ["--api_url", server.url, "--token", server.token, "--wait",
                                          "--input", str(tmp_path / "first" / "*"),
                                          "--dead_letter_path", str(tmp_path / "first-replayed") + "/"])
    assert {name: count(server, name) for name in names.values()} == {name: 1 for name in names.values()}

    _write_letters(tmp_path / "dl" / "dead-letters-1.jsonl",
                   [*letters[3:], _letter(odd, names["c"]), *no_name, bad_name, _letter(None, names["a"], "unencodable")])
    summary, printed = run_quietly(replay_dead_letters.run, [
        "--api_url", server.url, "--token", server.token, "--wait", "--num_shards", "2",
        "--input", str(tmp_path / "dl" / "*"), "--dead_letter_path", str(tmp_path / "replayed") + "/"])

    server.flush()
    for t, name in names.items():
        stored = server.query(f"SELECT id, t FROM {name} ORDER BY id")
        assert stored == [{"id": i, "t": t} for i, tt in enumerate("abc" * 10) if tt == t]  # no foreign rows
    assert [json.loads(q["c__raw"]) for q in server.quarantined_lines(names["c"])] == [json.loads(odd)]
    assert summary.rows_read == 32 and summary.rows_acknowledged == 28 and summary.rows_quarantined == 1
    assert summary.dead_letters_by_kind == {"unroutable": 3, "unreplayable": 1}
    assert summary.by_datasource[names["a"]].rows_acknowledged == 9
    still = dead_letters_in(tmp_path / "replayed")
    unroutable = sorted((d for d in still if d.kind == "unroutable"), key=lambda d: d.line)
    assert [(d.line, d.datasource) for d in unroutable] == [
        ('{"id": 2000, "t": 7}', ""), ('{"id": 2001}', ""), ('{"id": 2002, "t": "bad-name"}', f"{datasource}_bad-name")]
    assert [d.message for d in unroutable[:2]] == [
        "the datasource function raised ValueError: the dead letter names no data source (its element was "
        "unroutable); replay it with --datasource NAME"] * 2
    assert unroutable[2].message.startswith("the datasource function's result must match [A-Za-z_]")
    assert "data sources named by each record" in printed.splitlines()[0]

    # With --datasource, every line goes there, those that named no data source too.
    misc = f"{datasource}_misc"
    again, _ = run_quietly(replay_dead_letters.run, [
        "--api_url", server.url, "--token", server.token, "--wait", "--datasource", misc,
        "--input", str(tmp_path / "replayed" / "*"), "--dead_letter_path", str(tmp_path / "replayed-2") + "/"])
    assert sorted(r["id"] for r in server.query(f"SELECT id FROM {misc}")) == [2000, 2001, 2002]
    assert again.dead_letters_by_kind == {"unreplayable": 1}


def test_a_replay_that_delivers_every_line_passes_however_many_records_have_no_line(server, datasource, tmp_path):
    """Unreplayable records are carried over, not failed again: they count against no ratio, here or in the job."""
    letters = [*(_letter(json.dumps({"id": i}), datasource) for i in range(10)),
               *(_letter(None, datasource, kind="unencodable") for _ in range(5))]
    _write_letters(tmp_path / "dl" / "dead-letters-1.jsonl", letters)

    summary, printed = run_quietly(replay_dead_letters.run, sink_flags(
        server, datasource, "--input", str(tmp_path / "dl" / "*"), "--dead_letter_path", f"{tmp_path / 'out'}/",
        "--max_dead_letter_ratio", "0"))
    assert (summary.rows_read, summary.rows_acknowledged, summary.dead_letters) == (15, 10, 5)
    assert summary.dead_letters_by_kind == {"unreplayable": 5}
    assert summary.failure is None and "FAILED" not in printed
    assert sorted(d.kind for d in dead_letters_in(tmp_path / "out")) == ["unencodable"] * 5  # carried over

    # The check inside the job (Dataflow) counts the same way: it passes at a ratio of 0...
    with TestPipeline(runner="FnApiRunner") as p:
        replay_dead_letters.build(p, input_pattern=str(tmp_path / "dl" / "*"),
                                  write=WriteToTinybird(datasource=datasource, api_url=server.url, token=server.token),
                                  dead_letter_path=f"{tmp_path / 'in-job'}/", dead_letter_format="json",
                                  max_dead_letter_ratio=0.0)
    # ... and fails when a resent line fails again: 1 of the 10 lines, not 6 of 15 records.
    server.set_faults([{"status": 400, "when": "before", "sequence": [1], "datasource": datasource}])
    with (pytest.raises(Exception, match=r"1 of 10 rows read were dead-lettered \(10\.00%\)"),
          TestPipeline(runner="FnApiRunner") as p):
        replay_dead_letters.build(p, input_pattern=str(tmp_path / "dl" / "*"),
                                  write=WriteToTinybird(datasource=datasource, api_url=server.url, token=server.token,
                                                        max_batch_rows=1),
                                  dead_letter_path=f"{tmp_path / 'in-job-2'}/", dead_letter_format="json",
                                  max_dead_letter_ratio=0.05)


def test_a_line_the_sink_refuses_as_an_element_is_carried_over_whole(server, datasource, tmp_path):
    """Lines an orjson.Fragment made (not JSON; bytes that are not UTF-8, shown as \\x escapes) were sent as
    they were, and dead-lettered when their request was refused. As a replay's elements the sink refuses
    them (no JSON object): they must stay in the new dead letters whole, not as a 500-character repr."""
    pad = "x" * 2_000
    odd = [_letter(f'{{"id":1000,"price":9.99 EUR,"pad":"{pad}"}}', datasource),
           _letter(f'{{"id":1001,"s":"\\xff\\xfe","pad":"{pad}"}}', datasource, kind="retries_exhausted")]
    letters = [*(_letter(json.dumps({"id": i}), datasource) for i in range(10)), *odd]
    _write_letters(tmp_path / "dl" / "dead-letters-1.jsonl", letters)

    summary, _ = run_quietly(replay_dead_letters.run, sink_flags(
        server, datasource, "--input", str(tmp_path / "dl" / "*"), "--dead_letter_path", f"{tmp_path / 'out'}/"))

    assert _ids(server, datasource) == list(range(10))
    assert sorted(dead_letters_in(tmp_path / "out"), key=repr) == sorted(odd, key=repr)  # carried over unchanged
    assert (summary.rows_read, summary.rows_acknowledged, summary.dead_letters_by_kind) == (12, 10, {"unreplayable": 2})
    assert summary.failure is None


_NOT_RECORDS = {
    "a cut last line": None,
    "a line of another file": b"[1, 2]",
    # An event: a kind of its own, and fields no dead letter has (read back as a record of
    # None fields, it was carried over as one and failed the Avro writer).
    "an event line": b'{"id": 7, "kind": "view", "line": "home"}',
    "an object without a kind": b'{"line": "{}", "message": "m"}',
}


@pytest.mark.parametrize("cut", sorted(_NOT_RECORDS))
@pytest.mark.parametrize("dead_letter_format", ["json", "avro"])
def test_a_line_that_is_not_a_record_is_carried_over_and_the_replay_goes_on(
        server, datasource, tmp_path, cut, dead_letter_format):
    """A file cut short (copied while written, a full disk), or a line of some other file: failing the
    job after the lines before it were posted would store those twice when the replay is run again."""
    letters = [_letter(json.dumps({"id": i}), datasource) for i in range(20)]
    bad = _NOT_RECORDS[cut] or orjson.dumps(letters[0]._asdict())[:50]
    path = tmp_path / "dl" / "dead-letters-1.jsonl"
    _write_letters(path, letters)
    path.write_bytes(path.read_bytes() + bad + b"\n")

    summary, _ = run_quietly(replay_dead_letters.run, sink_flags(
        server, datasource, "--input", str(tmp_path / "dl" / "*"), "--dead_letter_path", f"{tmp_path / 'out'}/",
        "--max_batch_rows", "5", "--dead_letter_format", dead_letter_format))

    assert _ids(server, datasource) == list(range(20))
    (carried,) = dead_letters_in(tmp_path / "out")
    assert (carried.kind, carried.line, carried.datasource) == ("unencodable", None, "")
    assert carried.message.startswith(f"line 21 of {path} is not a dead-letter record: ")
    assert carried.element == repr(bad)
    assert (summary.rows_read, summary.rows_acknowledged, summary.dead_letters_by_kind) == (21, 20, {"unreplayable": 1})


def test_records_of_a_yaml_step_that_kept_three_fields_are_replayed_and_written_again_as_avro(
        server, datasource, tmp_path):
    """README's Beam YAML example writes kind, message and line only: the replay sends the lines (with
    --datasource, which they do not name) and writes what fails again, as Avro too (it needs every
    field that the sink's own records have)."""
    path = tmp_path / "dl" / "undelivered.jsonl"
    path.parent.mkdir()
    lines = [{"kind": "oversize", "message": "too long", "line": json.dumps({"id": i})} for i in range(6)]
    lines.append({"kind": "unencodable", "message": "not JSON", "line": None})
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))

    summary, _ = run_quietly(replay_dead_letters.run, sink_flags(
        server, datasource, "--input", str(path), "--dead_letter_path", f"{tmp_path / 'out'}/",
        "--dead_letter_format", "avro"))

    assert _ids(server, datasource) == list(range(6))
    (carried,) = dead_letters_in(tmp_path / "out")
    assert (carried.kind, carried.message, carried.line, carried.datasource, carried.attempts) == (
        "unencodable", "not JSON", None, "", 0)
    assert (summary.rows_read, summary.rows_acknowledged, summary.dead_letters_by_kind) == (7, 6, {"unreplayable": 1})


def test_following_each_runs_replay_hint_resends_that_runs_dead_letters_only(server, datasource, tmp_path, monkeypatch):
    """Runs collect their dead letters in one folder: a hint for all of it would resend what was replayed before."""
    monkeypatch.chdir(tmp_path)

    def files_run(ids) -> tuple[list[str], list[str]]:
        source = tmp_path / f"in-{ids[0]}.ndjson"
        source.write_text("".join(f'{{"id": {i}}}\n' for i in ids))
        server.set_faults([{**_REJECT_FIRST_REQUEST, "datasource": datasource}])  # the first 5 rows
        summary, printed = run_quietly(files_to_tinybird.run, sink_flags(
            server, datasource, "--input", str(source), "--max_batch_rows", "5", "--num_shards", "1",
            "--dead_letter_path", "dead-letters/", "--max_dead_letter_ratio", "1"))
        server.clear_faults()
        hint = next(line for line in printed.splitlines() if "pipelines.replay_dead_letters" in line)
        return summary.dead_letter_files, shlex.split(hint)[3:]  # less "python -m pipelines.replay_dead_letters"

    def follow(args) -> None:
        summary, _ = run_quietly(replay_dead_letters.run, [
            *args, "--api_url", server.url, "--token", server.token, "--datasource", datasource, "--wait"])
        assert (summary.rows_read, summary.rows_acknowledged, summary.dead_letters) == (5, 5, 0)

    first_files, first_hint = files_run(range(0, 10))
    follow(first_hint)
    second_files, second_hint = files_run(range(100, 110))
    assert set(first_files).isdisjoint(second_files) and second_files  # the summary lists this run's files
    assert {os.path.dirname(f) for f in first_files + second_files} == {str(tmp_path / "dead-letters")}
    follow(second_hint)

    server.flush()
    stored = [r["id"] for r in server.query(f"SELECT id FROM {datasource} ORDER BY id")]
    assert stored == [*range(0, 10), *range(100, 110)]  # each once: the first run's were not resent again


def test_the_replay_command_is_printed_only_when_a_dead_letter_has_a_line_to_resend(server, datasource, tmp_path,
                                                                                   monkeypatch):
    """Counted by the sink (lineless_dead_letters), not guessed from kinds: an unroutable row has a line
    when it could be encoded, and none when it could not."""
    monkeypatch.chdir(tmp_path)
    good = [json.dumps({"id": i, "type": "a"}) for i in range(5)]

    def routed_run(lines):
        source = tmp_path / "in.ndjson"
        source.write_text("\n".join(lines) + "\n")
        return run_quietly(files_to_tinybird.run, [
            "--api_url", server.url, "--token", server.token, "--wait", "--input", str(source),
            "--datasource_field", "type", "--datasource_prefix", f"{datasource}_",
            "--dead_letter_path", "dl/", "--max_dead_letter_ratio", "1"])

    # Not JSON objects: unroutable, and without a line (as the demo's two bad rows).
    summary, printed = routed_run([*good, '{"id": "broken"', "[1, 2]"])
    assert (summary.dead_letters, summary.dead_letters_by_kind, summary.lineless_dead_letters) == (
        2, {"unroutable": 2}, 2)
    assert "pipelines.replay_dead_letters" not in printed
    # A row without the field has a line: it can be resent with --datasource.
    summary, printed = routed_run([*good, '{"id": "broken"', json.dumps({"id": 9})])
    assert (summary.dead_letters, summary.lineless_dead_letters) == (2, 1)
    assert "Resend the dead letters once their cause is fixed:" in printed
    assert "those that name none need --datasource NAME" in printed
