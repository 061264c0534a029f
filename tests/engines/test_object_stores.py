"""The files job and the replay job on the object stores of the clouds, against their local
stand-ins: ``gs://`` on fake-gcs-server (``STORAGE_EMULATOR_HOST``, which Beam's GCS client,
google-cloud-storage, honours) and ``s3://`` on moto's server (Beam's ``--s3_endpoint_url``).

Each round trip: events read from the bucket (in ranges of 2 KiB, each read from its own offset
of the object, as workers read a large file), the first request refused (400) so that 100 rows
and one unencodable line become dead letters in the bucket, then the replay job reads them back
and delivers the 100 rows; every id is stored exactly once. A dead-letter file is written under a
hidden ``.in-progress-`` name and renamed (a copy and a delete on both stores), so a reader of
``dead-letters*`` never sees it half-written: afterwards the bucket holds only whole files.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from engines_testlib import fake_gcs_server_binary, loopback_server, new_port, stored_ids
from pipelines_testlib import run_quietly, sink_flags

from pipelines import _formats, files_to_tinybird, replay_dead_letters
from sinks.tinybird.dead_letters import from_dict

ROWS = 600
BUCKET = "beam-tinybird-test"
_REJECT_FIRST_REQUEST = {"status": 400, "when": "before", "sequence": [1], "message": "injected: bad request"}


def _events() -> bytes:
    lines = [json.dumps({"id": i, "kind": "view"}) for i in range(ROWS)]
    lines.insert(ROWS // 2, '{"id": "broken"')  # cannot be encoded: dead-lettered without a line
    return ("\n".join(lines) + "\n").encode()


class _Store:
    """A bucket on a local stand-in: its URL scheme, the flags Beam needs, and a raw lister/reader."""

    def __init__(self, scheme: str, flags: list[str], client) -> None:
        self.scheme, self.flags, self._client = scheme, flags, client

    def url(self, key: str) -> str:
        return f"{self.scheme}://{BUCKET}/{key}"

    def put(self, key: str, data: bytes) -> None:
        if self.scheme == "gs":
            self._client.bucket(BUCKET).blob(key).upload_from_string(data)
        else:
            self._client.put_object(Bucket=BUCKET, Key=key, Body=data)

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under ``prefix``: its name (after the prefix) and its bytes."""
        if self.scheme == "gs":
            return {blob.name[len(prefix):]: blob.download_as_bytes()
                    for blob in self._client.list_blobs(BUCKET, prefix=prefix)}
        listed = self._client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        return {item["Key"][len(prefix):]: self._client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
                for item in listed}


def _copy_one_by_one(gcsio, pairs):
    for src, dest in pairs:
        gcsio.copy(src, dest)
    return [(src, dest, None) for src, dest in pairs]


def _delete_one_by_one(gcsio, paths):
    for path in paths:
        gcsio.delete(path)
    return [(path, None) for path in paths]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory) -> Iterator[_Store]:
    """A bucket on fake-gcs-server. Two stand-ins for what it lacks, both in this process (the
    jobs run on the FnApiRunner here): it has no JSON batch endpoint, with which Beam's gcsio
    renames (copies, then deletes) files ("ValueError: Bad response: not multi-part"), so
    renames go one object at a time; and Beam first looks for Google default credentials
    (the metadata server, retried for about 30 s) before it connects anonymously, so it is
    told at once that there are none."""
    from apache_beam.internal.gcp import auth
    from apache_beam.io.gcp.gcsio import GcsIO
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    port = new_port()
    log = tmp_path_factory.mktemp("fake-gcs") / "server.log"
    command = [str(fake_gcs_server_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
               "-backend", "memory", "-public-host", f"127.0.0.1:{port}", "-external-url", f"http://127.0.0.1:{port}"]
    with loopback_server(command, port=port, log=log) as server, pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", f"http://{server.address}")
        patch.setattr(auth._Credentials, "_credentials_init", True)
        patch.setattr(auth._Credentials, "_credentials", None)
        patch.setattr(GcsIO, "copy_batch", _copy_one_by_one)
        patch.setattr(GcsIO, "delete_batch", _delete_one_by_one)
        client = storage.Client(project="test", credentials=AnonymousCredentials())
        client.create_bucket(BUCKET)
        yield _Store("gs", [], client)


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[_Store]:
    import boto3

    port = new_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    moto_server = Path(sys.executable).with_name("moto_server")
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    with loopback_server([str(moto_server), "-H", "127.0.0.1", "-p", str(port)], port=port, log=log,
                         env={**os.environ, **keys}) as server:
        endpoint = f"http://{server.address}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        yield _Store("s3", [f"--s3_endpoint_url={endpoint}", "--s3_region_name=us-east-1",
                            "--s3_access_key_id=testing", "--s3_secret_access_key=testing"], client)


def _letters(store: _Store, prefix: str) -> list:
    """The dead letters under ``prefix``, each file read whole; no hidden temporary file left."""
    files = store.objects(prefix)
    assert files and all(name.startswith("dead-letters") and name.endswith(".jsonl") for name in files), sorted(files)
    return [from_dict(json.loads(line)) for data in files.values() for line in data.decode().splitlines()]


@pytest.mark.parametrize("store_name", ["gcs", "s3"])
def test_files_job_and_replay_round_trip_on_the_bucket(server, datasource, store_name, request, monkeypatch):
    store: _Store = request.getfixturevalue(store_name)
    monkeypatch.setattr(_formats, "_RANGE_BYTES", 2048)
    run = f"{datasource}/"
    store.put(f"{run}in/events.ndjson", _events())

    server.set_faults([{**_REJECT_FIRST_REQUEST, "datasource": datasource}])
    first, _ = run_quietly(files_to_tinybird.run, sink_flags(
        server, datasource, "--input", store.url(f"{run}in/*.ndjson"), "--max_batch_rows", "100",
        "--num_shards", "1", "--dead_letter_path", store.url(f"{run}dead/"), "--runner=FnApiRunner",
        *store.flags))
    server.clear_faults()
    letters = _letters(store, f"{run}dead/")
    rejected = [letter for letter in letters if letter.kind == "rejected"]
    assert len(rejected) == 100 and [letter.kind for letter in letters].count("unencodable") == 1
    assert (first.rows_read, first.rows_acknowledged, first.dead_letters) == (ROWS + 1, ROWS - 100, 101)
    rejected_ids = {json.loads(letter.line)["id"] for letter in rejected}
    assert stored_ids(server, datasource) == sorted(set(range(ROWS)) - rejected_ids)

    second, _ = run_quietly(replay_dead_letters.run, sink_flags(
        server, datasource, "--input", store.url(f"{run}dead/*"), "--dead_letter_path", store.url(f"{run}replayed/"),
        "--runner=FnApiRunner", *store.flags))
    assert (second.rows_read, second.rows_acknowledged, second.dead_letters_by_kind) == (
        101, 100, {"unreplayable": 1})
    assert stored_ids(server, datasource) == list(range(ROWS))  # every id once
    assert [letter.kind for letter in _letters(store, f"{run}replayed/")] == ["unencodable"]
    assert _letters(store, f"{run}dead/") == letters  # the input was left as it was


def test_the_gcs_client_honours_the_emulator_host(gcs: _Store):
    """Beam's gs:// file system (``gcsio``) talks to fake-gcs-server, not to Google."""
    from apache_beam.io.filesystems import FileSystems

    gcs.put("probe/hello.txt", b"hello")
    assert os.environ["STORAGE_EMULATOR_HOST"].startswith("http://127.0.0.1:")
    (match,) = FileSystems.match([gcs.url("probe/*")])
    assert [m.path for m in match.metadata_list] == [gcs.url("probe/hello.txt")]

