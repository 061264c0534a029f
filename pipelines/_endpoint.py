"""Where a pipeline sends: a real workspace, or the local Events API server it starts itself."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines._options import SinkConfig

_LOG = logging.getLogger(__name__)

LOCAL_DATA_DIR = "tinybird-local"
"""Where the embedded local server keeps its data, under the working directory."""


LOCAL_EXTRA_MODULES = ("aiohttp",)
"""What the ``local`` extra installs (pyproject.toml), by import name: the server runs in a
child process, so a missing one would show only there, as that process's traceback."""


class LocalServerUnavailable(RuntimeError):
    """The embedded run was asked for, but the local server's dependencies (``local`` extra) are missing."""


def check_local_extra() -> None:
    """Raises :class:`LocalServerUnavailable`, naming the extra to install, when its modules are missing."""
    missing = [name for name in LOCAL_EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise LocalServerUnavailable(
            f"without --api_url the job starts the local Events API server, which needs {', '.join(missing)} "
            "(the 'local' extra): pip install 'beam-tinybird[local]', or pass --api_url and a token")


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where the sink sends.

    Attributes:
        api_url: The Events API host.
        token: The embedded server's admin token, or None to let the sink find
            the user's token (``--token``, ``--token_secret``, ``--token_env``).
        server: The embedded :class:`tinybird_emulator.LocalServer`, or None.
        data_dir: The embedded server's data directory, or None.
    """

    api_url: str
    token: str | None = dataclasses.field(default=None, repr=False)
    server: Any = None
    data_dir: Path | None = None


@contextlib.contextmanager
def tinybird_endpoint(config: SinkConfig, *, data_dir: Path | None = None) -> Iterator[Endpoint]:
    """Yields the endpoint to send to; with no ``api_url``, a local server started for the run.

    The embedded server keeps its data in ``data_dir`` (default
    ``./tinybird-local/``), so consecutive runs add to the same data sources, and
    is stopped when the block ends.
    """
    if not config.embedded:
        yield Endpoint(api_url=str(config.api_url))
        return
    check_local_extra()
    # Imported here only: production runs (with --api_url) never need it or its dependencies.
    from tinybird_emulator import LocalServer

    data_dir = Path(data_dir if data_dir is not None else Path.cwd() / LOCAL_DATA_DIR).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with LocalServer(data_dir=data_dir, token=config.token) as server:
        _LOG.info("Started the local Events API server at %s (data in %s)", server.url, data_dir)
        yield Endpoint(api_url=server.url, token=server.token, server=server, data_dir=data_dir)
