"""Loopback guard for client subprocesses (the Tinybird CLI, the Python SDKs).

Put this folder first on ``PYTHONPATH`` and Python imports it at start-up: every
name lookup and every TCP connection to a host other than loopback is refused
before anything is sent (telemetry, version checks, region look-ups), and each
attempt, allowed or refused, is appended to ``$LOOPBACK_GUARD_LOG`` as one JSON
line so that a test can show what the client tried. tests/conftest.py guards the
test process itself; it cannot see into subprocesses.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket

_LOG = os.environ.get("LOOPBACK_GUARD_LOG", "")
_LOCAL_NAMES = {None, "", "localhost", "localhost.localdomain", "ip6-localhost"}


def _is_local(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if host in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    return address.is_loopback


def _record(kind: str, target: str, allowed: bool) -> None:
    if not _LOG:
        return
    line = json.dumps({"runtime": "python", "pid": os.getpid(), "kind": kind, "target": target, "allowed": allowed})
    # One write per line, opened in append mode: lines of concurrent processes do not interleave.
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


_getaddrinfo = socket.getaddrinfo
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _guarded_getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
    allowed = _is_local(host)
    _record("lookup", str(host), allowed)
    if not allowed:
        raise socket.gaierror(socket.EAI_NONAME, f"loopback guard: name lookup of {host!r} refused")
    return _getaddrinfo(host, *args, **kwargs)


def _guarded(method):  # type: ignore[no-untyped-def]
    def connect(self, address):  # type: ignore[no-untyped-def]
        if self.family in (socket.AF_INET, socket.AF_INET6):
            allowed = _is_local(address[0])
            _record("connect", f"{address[0]}:{address[1]}", allowed)
            if not allowed:
                raise PermissionError(f"loopback guard: connection to {address!r} refused")
        return method(self, address)

    return connect


socket.getaddrinfo = _guarded_getaddrinfo
socket.socket.connect = _guarded(_connect)  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded(_connect_ex)  # type: ignore[method-assign]
