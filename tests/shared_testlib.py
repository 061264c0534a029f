"""What every test folder shares: the admin token of the session's local server.

Each folder has one helper module of its own, named after it
(``sink_testlib``, ``emulator_testlib``, ``pipelines_testlib``,
``reliability_testlib``); the fixtures they all use are in ``tests/conftest.py``.
"""

from __future__ import annotations

# Distinctive, so that a test can search logs, files, reprs and metrics for it.
TOKEN = "p.SECRET-test-token-7f3a9c51d2"
