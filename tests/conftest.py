"""Every test: no traffic leaves loopback.

Tests talk to servers they start on 127.0.0.1. A name lookup or a connection to
anything else (a stray default URL, a runner that downloads a binary) is
refused on the spot and fails the test that made it, in this process; servers
and workers in other processes are started on loopback by the tests.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

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
