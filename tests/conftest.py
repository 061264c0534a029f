"""Every test: no traffic leaves loopback; the fixtures every test folder shares.

Tests talk to servers they start on 127.0.0.1. A name lookup or a connection to
anything else (a stray default URL, a runner that downloads a binary) is
refused on the spot and fails the test that made it, in this process; servers
and workers in other processes are started on loopback by the tests.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from shared_testlib import TOKEN

from tinybird_emulator import LocalServer

REPO_ROOT = Path(__file__).resolve().parents[1]
# Workers of the multi-processing and portable runners are new processes: they
# must find the project's packages whatever their working directory.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)

_LOCAL_NAMES = {None, "", "localhost", "localhost.localdomain", "ip6-localhost"}
_attempts: list[str] = []


def _is_local(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if host in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _refuse(what: str):
    _attempts.append(what)
    raise OSError(f"tests/conftest.py: traffic outside loopback refused: {what}")


_getaddrinfo = socket.getaddrinfo
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _is_local(host):
        _refuse(f"name lookup of {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


def _guarded(method):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            _refuse(f"connection to {address!r}")
        return method(self, address)
    return connect


@pytest.fixture(scope="session", autouse=True)
def _loopback_only():
    socket.getaddrinfo = _guarded_getaddrinfo
    socket.socket.connect = _guarded(_connect)
    socket.socket.connect_ex = _guarded(_connect_ex)
    try:
        yield
    finally:
        socket.getaddrinfo = _getaddrinfo
        socket.socket.connect = _connect
        socket.socket.connect_ex = _connect_ex


@pytest.fixture(autouse=True)
def _no_traffic_outside_loopback(_loopback_only):
    _attempts.clear()
    yield
    attempts, _attempts[:] = list(_attempts), []
    assert not attempts, f"the test tried to reach outside loopback: {attempts}"


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that configures logging (a command line's ``main`` run in this process) leaves
    no handler behind: one bound to the test's captured, then closed, stderr would make every
    later record a "--- Logging error ---" print-out of the record and its exception."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# -- the local Events API server ---------------------------------------------------------

_names = itertools.count(1)


@pytest.fixture(scope="session")
def local_server(tmp_path_factory) -> Iterator[LocalServer]:
    """One local server for the session (admin token ``shared_testlib.TOKEN``, no rate limit).

    Tests that restart a server or change its limits start their own."""
    with LocalServer(data_dir=tmp_path_factory.mktemp("tinybird-local"), token=TOKEN, rate_limit_rps=None) as srv:
        yield srv


@pytest.fixture
def server(local_server: LocalServer) -> Iterator[LocalServer]:
    """The session's server, without fault rules and with its counters at zero."""
    local_server.clear_faults()
    local_server.flush()
    local_server.reset_stats()
    yield local_server
    local_server.clear_faults()


@pytest.fixture
def datasource(request) -> str:
    """A data source name of this test only."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:60]
    return f"t{next(_names)}_{base}"
