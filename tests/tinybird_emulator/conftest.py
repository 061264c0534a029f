"""Fixtures of the local Events API server tests: real servers on loopback ports."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from emulator_testlib import ADMIN_TOKEN, EventsClient

from tinybird_emulator import LocalServer


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """One server for the tests that do not restart it or change its limits."""
    with LocalServer(
        data_dir=tmp_path_factory.mktemp("emulator-session"), token=ADMIN_TOKEN, rate_limit_rps=None
    ) as srv:
        yield srv


@pytest.fixture
def client(server: LocalServer) -> Iterator[EventsClient]:
    events = EventsClient(server)
    yield events
    server.clear_faults()
    events.session.close()


@pytest.fixture
def ds() -> str:
    """A data source name no other test uses."""
    return "t_" + uuid.uuid4().hex[:12]
