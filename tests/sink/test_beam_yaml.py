"""Beam YAML: the README's pipeline, run by ``python -m apache_beam.yaml.main`` against the local server.

``WriteToTinybird`` as a ``PyTransform`` by its class name, and a later YAML
step (``WriteToJson``) taking ``ToTinybird.dead_letters`` as its input.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import pytest
from shared_testlib import TOKEN
from sink_testlib import stored_rows

from sinks.tinybird import DeadLetter, WriteToTinybird, WriteToTinybirdResult

REPO_ROOT = Path(__file__).resolve().parents[2]
_GOOD_ROWS = 40
_OVERSIZE_ID = 999
_OVERSIZE_BYTES = 8 * 1024 * 1024 + 100  # over the default max_batch_bytes (8 MiB)


def _readme_yaml(index: int = 0) -> str:
    """A YAML block of README.md's "Beam YAML" section (the first, or the one by field), as a user would copy it."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Beam YAML\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 2
    return blocks[index]


def _run_yaml(pipeline_file: Path, variables: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "apache_beam.yaml.main", f"--yaml_pipeline_file={pipeline_file}",
         "--runner=FnApiRunner", f"--jinja_variables={json.dumps(variables)}"],
        cwd=cwd, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TINYBIRD_TOKEN": TOKEN})


def test_the_result_is_its_named_outputs():
    # Built, never run: nothing listens on port 9.
    p = beam.Pipeline(runner="FnApiRunner")
    rows = p | beam.Create([{"id": 1}])
    without_files = rows | "NoFiles" >> WriteToTinybird(datasource="e", token="t", api_url="http://127.0.0.1:9")
    with_files = rows | "Files" >> WriteToTinybird(
        datasource="e", token="t", api_url="http://127.0.0.1:9", dead_letter_path="/tmp/unused/")
    assert isinstance(without_files, WriteToTinybirdResult) and isinstance(without_files, dict)
    assert list(without_files) == ["dead_letters"] and without_files.dead_letter_files is None
    assert without_files.dead_letters is without_files["dead_letters"]
    assert list(with_files) == ["dead_letters", "dead_letter_files"]
    assert with_files.dead_letter_files is with_files["dead_letter_files"]
    assert with_files.dead_letters.element_type == DeadLetter


def test_the_readme_yaml_pipeline_stores_every_row_and_writes_its_dead_letters(server, datasource, tmp_path):
    source = tmp_path / "events.ndjson"
    with source.open("w") as out:
        for i in range(_GOOD_ROWS):
            out.write(json.dumps({"id": i, "name": f"user {i}"}) + "\n")
        out.write(json.dumps({"id": _OVERSIZE_ID, "name": "x" * _OVERSIZE_BYTES}) + "\n")
    pipeline_file = tmp_path / "to_tinybird.yaml"
    pipeline_file.write_text(_readme_yaml())
    variables = {"input": str(source), "datasource": datasource, "api_url": server.url,
                 "dead_letters": str(tmp_path / "dead-letters" / "undelivered")}

    result = _run_yaml(pipeline_file, variables, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    assert TOKEN not in result.stdout + result.stderr
    server.flush()
    stored = server.query(f"SELECT id, name FROM {datasource} ORDER BY id", token=TOKEN)
    assert stored == [{"id": i, "name": f"user {i}"} for i in range(_GOOD_ROWS)]
    files = sorted((tmp_path / "dead-letters").glob("undelivered*"))
    records = [json.loads(line) for path in files for line in path.read_text().splitlines() if line.strip()]
    assert len(records) == 1
    (record,) = records
    assert record["kind"] == "oversize"
    assert record["message"].startswith("the encoded row is ") and "over max_batch_bytes=8388608" in record["message"]
    assert json.loads(record["line"]) == {"id": _OVERSIZE_ID, "name": "x" * _OVERSIZE_BYTES}


def test_the_readme_yaml_pipeline_by_field_sends_each_type_to_its_data_source(server, datasource, tmp_path):
    types = ("click", "view", "purchase")
    source = tmp_path / "events.ndjson"
    with source.open("w") as out:
        for i in range(_GOOD_ROWS * 3):
            out.write(json.dumps({"id": i, "type": types[i % 3], "name": f"user {i}"}) + "\n")
        out.write(json.dumps({"id": 1000, "type": None, "name": "no type"}) + "\n")
        out.write(json.dumps({"id": 1001, "type": "bad-name", "name": "bad name"}) + "\n")
    pipeline_file = tmp_path / "by_field.yaml"
    pipeline_file.write_text(_readme_yaml(1))
    prefix = f"{datasource}_"
    variables = {"input": str(source), "prefix": prefix, "api_url": server.url,
                 "dead_letters": str(tmp_path / "dead-letters" / "undelivered")}

    result = _run_yaml(pipeline_file, variables, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    server.flush()
    for kind in types:
        stored = server.query(f"SELECT id, type, name FROM {prefix}{kind} ORDER BY id", token=TOKEN)
        assert stored == [{"id": i, "type": kind, "name": f"user {i}"} for i in range(_GOOD_ROWS * 3)
                          if types[i % 3] == kind]
    files = sorted((tmp_path / "dead-letters").glob("undelivered*"))
    records = sorted((json.loads(line) for path in files for line in path.read_text().splitlines() if line.strip()),
                     key=lambda r: json.loads(r["line"])["id"])
    assert [(json.loads(r["line"])["id"], r["kind"], r["datasource"]) for r in records] == [
        (1000, "unroutable", ""), (1001, "unroutable", f"{prefix}bad-name")]
    assert "NoneType" in records[0]["message"] and "must match" in records[1]["message"]


def test_write_to_tinybird_by_field_builds_the_sink_with_datasource_from_field():
    from sinks.tinybird import DatasourceFromField, WriteToTinybirdByField

    sink = WriteToTinybirdByField(datasource_field="type", datasource_prefix="ev_", token="t",
                                  api_url="http://127.0.0.1:9")
    assert isinstance(sink, WriteToTinybird)
    assert sink._datasource == DatasourceFromField("type", prefix="ev_")  # pylint: disable=protected-access
    with pytest.raises(TypeError, match="not datasource"):
        WriteToTinybirdByField(datasource_field="type", datasource="events", token="t")
    with pytest.raises(ValueError, match=r"datasource_prefix must be letters, digits and _.*'9x'"):
        WriteToTinybirdByField(datasource_field="type", datasource_prefix="9x", token="t")
    with pytest.raises(ValueError, match="field must be a non-empty str"):
        WriteToTinybirdByField(datasource_field="", token="t")


_YAML_RETRY = """
pipeline:
  transforms:
    - type: Create
      name: Events
      config:
        elements: [{{id: 1}}, {{id: 2}}, {{id: 3}}]
    - type: PyTransform
      name: ToTinybird
      input: Events
      config:
        constructor: sinks.tinybird.WriteToTinybird
        kwargs:
          datasource: {datasource}
          api_url: {api_url}
          token_env: TINYBIRD_TOKEN
          wait: yes
          retry_policy: {retry_policy}
"""


@pytest.mark.parametrize("retry_policy, stored", [
    ("{max_attempts: 1}", 0),                                               # the 503 is not retried
    ("{max_attempts: 2, initial_backoff_secs: 0.01, max_backoff_secs: 0.02}", 3),  # one retry delivers
])
def test_yaml_kwargs_set_the_retry_policy_as_a_mapping(server, datasource, monkeypatch, retry_policy, stored):
    """YAML can only write a mapping: the sink takes one for retry_policy, field by field."""
    from apache_beam.yaml import yaml_transform

    monkeypatch.setenv("TINYBIRD_TOKEN", server.token)
    server.set_faults([{"status": 503, "when": "before", "sequence": [1], "datasource": datasource}])
    with beam.Pipeline(runner="BundleBasedDirectRunner") as p:
        yaml_transform.expand_pipeline(p, _YAML_RETRY.format(
            datasource=datasource, api_url=server.url, retry_policy=retry_policy))
    assert stored_rows(server, datasource) == stored
    # Every request to the data source: the 503, then, with a retry, the one that stored the rows.
    assert [(r["matched"], r["fired"]) for r in server.faults()["state"]] == [(1 if stored == 0 else 2, 1)]
