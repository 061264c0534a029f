"""Fixtures of the reliability tests: one local server for the session (stats and
faults cleared around each test) and one data source name per test."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import pytest
from reliability_testlib import TOKEN

from tinybird_emulator import LocalServer

REPO_ROOT = Path(__file__).resolve().parents[2]
# Workers of runners that start processes must find the project's packages.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)

_names = itertools.count(1)


@pytest.fixture(scope="session")
def _session_server(tmp_path_factory):
    with LocalServer(
        data_dir=tmp_path_factory.mktemp("tinybird-reliability"), token=TOKEN, rate_limit_rps=None,
    ) as server:
        yield server


@pytest.fixture
def server(_session_server):
    """The session's server, without fault rules and with its counters at zero."""
    _session_server.clear_faults()
    _session_server.flush()
    _session_server.reset_stats()
    yield _session_server
    _session_server.clear_faults()


@pytest.fixture
def datasource(request) -> str:
    """A data source name of this test only."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:50]
    return f"r{next(_names)}_{base}"
