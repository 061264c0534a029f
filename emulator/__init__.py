"""A local, durable, fault-injecting imitation of Tinybird's Events API (``POST /v0/events``).

It stores rows in SQLite inside a data dir, infers each data source's schema
from its first events, quarantines rows that do not fit, enforces the documented
limits (429, 413, 503) and can be told to fail chosen requests, before or after
storing them, for reliability tests.

Use it from Python (tests, the pipelines' embedded default)::

    from emulator import LocalServer

    with LocalServer(data_dir="/tmp/tb", rate_limit_rps=None) as server:
        requests.post(f"{server.url}/v0/events?name=events&wait=true",
                      data=b'{"a": 1}\\n', headers={"Authorization": f"Bearer {server.token}"})
        server.set_faults([{"status": 503, "when": "before", "sequence": [1, 2]}])
        server.query("SELECT count(*) AS n FROM events")   # [{"n": 1}]
        server.stats()["rows"]["stored"]                   # 1

or from the command line: ``python -m emulator serve --port 7181 --data-dir DIR``
(see ``python -m emulator --help``). ``python -m emulator.bench`` measures it.
"""

from emulator._faults import FaultRule
from emulator._process import LocalServer, LocalServerError

__all__ = ["FaultRule", "LocalServer", "LocalServerError"]
