"""Fixtures of the local Events API server tests: a client of the session's server
(``tests/conftest.py``) and data source names; tests that restart a server or change
its limits start their own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from emulator_testlib import EventsClient

from tinybird_emulator import LocalServer


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
