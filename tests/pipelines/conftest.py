"""Fixtures of the pipelines' tests: one local Events API server, one data source per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tinybird_emulator import LocalServer

REPO_ROOT = Path(__file__).resolve().parents[2]

# Workers of the multi-processing and portable runners are new processes: they
# must find the project's packages whatever their working directory.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    with LocalServer(data_dir=tmp_path_factory.mktemp("tinybird"), rate_limit_rps=None) as running:
        yield running


@pytest.fixture()
def datasource(request, server) -> str:
    """A data source name of this test only; its fault rules are cleared afterwards."""
    name = "p_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:80]
    yield name
    server.clear_faults()
