"""A local, durable, fault-injecting imitation of Tinybird's Events API (``POST /v0/events``).

It stores rows in SQLite inside a data dir, infers each data source's schema
from its first events, quarantines rows that do not fit (``NAME_quarantine``),
enforces the documented limits (429, 413, 503, with ``X-RateLimit-*`` headers)
and can be told to fail chosen requests, before or after storing them.

From Python (tests, the pipelines' embedded default), the server runs as a
subprocess on a free loopback port::

    from tinybird_emulator import LocalServer

    with LocalServer(data_dir="/tmp/tb", rate_limit_rps=None) as server:
        requests.post(f"{server.url}/v0/events?name=events&wait=true",
                      data=b'{"a": 1}\\n', headers={"Authorization": f"Bearer {server.token}"})
        server.query("SELECT count(*) AS n FROM events")        # [{"n": 1}]
        server.set_faults([{"status": 503, "when": "before", "sequence": [1, 2]}])
        server.stats()["rows"]["stored"]                        # 1
        server.create_token("app", scopes=["DATASOURCE:APPEND:events"])
        server.kill(); server.restart()                         # data acknowledged with 200 is kept

Fault rules are JSON objects (see :class:`FaultRule`): ``status`` (400-599) or
``reset: true``; ``when``: ``"before"`` (nothing stored) or ``"after"`` (stored and
committed, then the failure); ``latency_secs``; ``datasource``; ``probability``
with ``seed``, or ``sequence`` (1-based ordinals of matching requests);
``times``; ``retry_after_secs``; ``message``.

From the command line: ``python -m tinybird_emulator serve --port 7181 --data-dir DIR``
(see ``python -m tinybird_emulator --help``). ``python -m tinybird_emulator.bench`` measures it.
"""

from tinybird_emulator._faults import FaultRule
from tinybird_emulator._process import LocalServer, LocalServerError

__all__ = ["FaultRule", "LocalServer", "LocalServerError"]
