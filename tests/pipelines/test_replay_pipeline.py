"""Replay dead letters against a local server: rows the server rejected are resent; overlap is refused."""

from __future__ import annotations

import json
import os

import pytest
from pipelines_testlib import RUNNERS, count, run_quietly, sink_flags
from shared_testlib import dead_letters_in

from pipelines import files_to_tinybird, replay_dead_letters
from pipelines._options import UsageError
from pipelines.replay_dead_letters import check_output_outside_input, input_location

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
