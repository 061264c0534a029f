"""The summary printed at the end of a run, from the job's metrics."""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.runner import PipelineResult

from pipelines._dead_letter_ratio import dead_letter_ratio, ratio_failure
from pipelines._endpoint import Endpoint
from pipelines._options import SinkConfig
from pipelines._progress import METRICS_NAMESPACE, ROWS_READ
from sinks.tinybird._metrics import LINELESS_DEAD_LETTERS

_LOG = logging.getLogger(__name__)

SINK_METRICS_NAMESPACE = "tinybird"
DATASOURCE_NAMESPACE_PREFIX = SINK_METRICS_NAMESPACE + "/"
"""The sink counts ``rows_acknowledged`` and ``dead_letters`` per data source in ``tinybird/<datasource>``."""
MAX_DATASOURCES_SHOWN = 20
"""Data sources the summary lists one by one; the rest are counted on one line."""
UNREPLAYABLE_KIND = "unreplayable"
"""The replay's dead-letter kind for records without a line (counted by ``pipelines.replay_dead_letters``)."""
MAX_SQL_HINTS = 5
"""Data sources the summary prints a SQL command for."""


@dataclasses.dataclass(frozen=True)
class DatasourceFigures:
    """What one data source of the run got, from the sink's per-data-source counters."""

    rows_acknowledged: int = 0
    dead_letters: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSummary:
    """What a run did, from its metrics.

    Attributes:
        rows_read: Rows the pipeline read and handed to the sink.
        rows_acknowledged: Rows the server accepted (2xx), quarantined ones included.
        rows_quarantined: Of those, rows the server put in ``<datasource>_quarantine``.
        dead_letters: Rows that were not delivered (or, for replay, still not delivered).
        dead_letters_by_kind: ``dead_letters`` split by :class:`~sinks.tinybird.DeadLetterKind` value.
        requests: HTTP requests made, retries included.
        retries: Requests that were retries.
        extra: Other counters of the pipeline's own namespace (e.g. ``unreplayable``).
        elapsed_secs: Wall time of the run.
        dead_letter_files: Dead-letter files found under the dead-letter path after the run.
        failure: Why the run counts as failed (too many dead letters), or None.
        by_datasource: The figures of each data source rows were meant for, by name.
        lineless_dead_letters: Of ``dead_letters``, those holding no line (never
            encodable, or a replay's unreplayable records): nothing to resend.
    """

    rows_read: int
    rows_acknowledged: int
    rows_quarantined: int
    dead_letters: int
    dead_letters_by_kind: Mapping[str, int]
    requests: int
    retries: int
    extra: Mapping[str, int]
    elapsed_secs: float
    dead_letter_files: tuple[str, ...] = ()
    failure: str | None = None
    by_datasource: Mapping[str, DatasourceFigures] = dataclasses.field(default_factory=dict)
    lineless_dead_letters: int = 0

    @property
    def rows_stored(self) -> int:
        """Rows that reached the data source itself (acknowledged, not quarantined)."""
        return self.rows_acknowledged - self.rows_quarantined

    @property
    def dead_letter_ratio(self) -> float:
        """Dead letters per row read (1.0 when dead letters came with no row read)."""
        return dead_letter_ratio(rows_read=self.rows_read, dead_letters=self.dead_letters)


def judge(summary: RunSummary, *, max_dead_letter_ratio: float) -> RunSummary:
    """``summary`` with a ``failure`` when its dead-letter ratio is above ``max_dead_letter_ratio``.

    A replay's unreplayable records (no line: nothing to resend) count on
    neither side: they are carried over, not failed again, and counting them
    would fail every replay of a folder that holds one, however much of the
    rest was delivered.
    """
    carried = summary.dead_letters_by_kind.get(UNREPLAYABLE_KIND, 0)
    failure = ratio_failure(rows_read=summary.rows_read - carried, dead_letters=summary.dead_letters - carried,
                            max_ratio=max_dead_letter_ratio)
    if failure is not None and carried:
        failure += f" ({carried:,} unreplayable records, carried over, are not counted)"
    return summary if failure is None else dataclasses.replace(summary, failure=failure)


def counter_totals(result: PipelineResult, namespace: str) -> dict[str, int]:
    """Counters of ``namespace``, summed over steps; committed values where the runner has them."""
    totals: dict[str, int] = {}
    query = result.metrics().query(MetricsFilter().with_namespace(namespace))
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + int(value or 0)
    return totals


def datasource_figures(result: PipelineResult) -> dict[str, DatasourceFigures]:
    """The sink's per-data-source counters (namespaces ``tinybird/<datasource>``), by data source, sorted."""
    totals: dict[str, dict[str, int]] = {}
    for counter in result.metrics().query(MetricsFilter())["counters"]:
        namespace = counter.key.metric.namespace
        if not namespace.startswith(DATASOURCE_NAMESPACE_PREFIX):
            continue
        value = counter.committed if counter.committed is not None else counter.attempted
        figures = totals.setdefault(namespace[len(DATASOURCE_NAMESPACE_PREFIX):], {})
        figures[counter.key.metric.name] = figures.get(counter.key.metric.name, 0) + int(value or 0)
    return {name: DatasourceFigures(rows_acknowledged=figures.get("rows_acknowledged", 0),
                                    dead_letters=figures.get("dead_letters", 0))
            for name, figures in sorted(totals.items())}


def summarise(result: PipelineResult, *, elapsed_secs: float,
              dead_letter_files: Sequence[str] = ()) -> RunSummary:
    """A :class:`RunSummary` from a finished pipeline's metrics.

    The pipeline's own ``dead_letters_<kind>`` counters (e.g. replay's
    ``dead_letters_unreplayable``) add to the sink's dead letters.
    """
    sink = counter_totals(result, SINK_METRICS_NAMESPACE)
    own = counter_totals(result, METRICS_NAMESPACE)
    prefix = "dead_letters_"
    by_kind: dict[str, int] = {}
    for name, value in sorted(sink.items()) + sorted(own.items()):
        if name.startswith(prefix) and value:
            by_kind[name[len(prefix):]] = by_kind.get(name[len(prefix):], 0) + value
    own_dead_letters = sum(value for name, value in own.items() if name.startswith(prefix))
    return RunSummary(
        rows_read=own.get(ROWS_READ, 0),
        rows_acknowledged=sink.get("rows_acknowledged", 0),
        rows_quarantined=sink.get("rows_quarantined", 0),
        dead_letters=sink.get("dead_letters", 0) + own_dead_letters,
        dead_letters_by_kind=by_kind,
        requests=sink.get("requests", 0),
        retries=sink.get("retries", 0),
        extra={name: value for name, value in own.items() if name != ROWS_READ and not name.startswith(prefix)},
        elapsed_secs=elapsed_secs,
        dead_letter_files=tuple(dead_letter_files),
        by_datasource=datasource_figures(result),
        lineless_dead_letters=sink.get(LINELESS_DEAD_LETTERS, 0) + by_kind.get(UNREPLAYABLE_KIND, 0),
    )


def list_dead_letter_files(path: str | None, *, label: str | None = None, since_epoch_secs: float = 0.0) -> list[str]:
    """This run's dead-letter files under ``path`` (a directory), sorted.

    Files of earlier runs stay in the same directory (their names never
    collide): a run's files carry its ``label`` (the pipelines give every run
    one); without one, those written since ``since_epoch_secs`` are listed.
    """
    if not path:
        return []
    if label is not None:
        since_epoch_secs = 0.0
    pattern = dead_letter_pattern(path, label)
    try:
        matches = FileSystems.match([pattern])[0].metadata_list
    except Exception:
        _LOG.debug("could not list %s", pattern, exc_info=True)
        return []
    return sorted(m.path for m in matches
                  if not m.last_updated_in_seconds or m.last_updated_in_seconds >= since_epoch_secs)


def dead_letter_pattern(path: str, label: str | None) -> str:
    """A glob for the dead-letter files under ``path`` labelled ``label`` (every one without a label)."""
    return FileSystems.join(path.rstrip("/"), "dead-letters*" if label is None else f"dead-letters-{label}-*")


def display_path(path: str) -> str:
    """``path`` relative to the working directory when it is under it (``./x``), else as is."""
    if "://" in path:
        return path
    try:
        relative = Path(path).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path
    text = "./" + relative.as_posix() if str(relative) != "." else "."
    return text + "/" if path.endswith("/") and not text.endswith("/") else text


def replay_paths(dead_letter_path: str, *, label: str | None) -> tuple[str, str]:
    """The ``--input`` and ``--dead_letter_path`` of the replay command for a run's dead letters.

    It reads this run's files alone (``dead-letters-<label>-*``: the folder may
    hold earlier runs' too, already replayed) and writes what fails again next
    to their folder, in ``<name>-replayed/``, on the same filesystem and in the
    same bucket. A bucket's root (``gs://bucket``) or the filesystem's has no
    name and no place next to it there: the replay writes in ``replayed/``
    inside it, where the files it reads are not.
    """
    files = f"dead-letters-{label}-*" if label else "dead-letters*"
    if "://" in dead_letter_path:
        scheme, rest = dead_letter_path.split("://", 1)
        folder = f"{scheme}://{rest.rstrip('/')}"
        if "/" not in rest.rstrip("/"):
            return f"{folder}/{files}", f"{folder}/replayed/"
        parent, name = folder.rsplit("/", 1)
        return f"{folder}/{files}", f"{parent}/{name}-replayed/"
    resolved = Path(dead_letter_path).resolve()
    shown = display_path(str(resolved)).rstrip("/")
    if not resolved.name:
        return f"{shown}/{files}", f"{resolved}replayed/"
    return f"{shown}/{files}", display_path(str(resolved.with_name(resolved.name + "-replayed"))) + "/"


def _python_command() -> str:
    """The interpreter running this job as the user can type it: ``.venv/bin/python``
    from the checkout, else its full path (not resolved: a venv's python is a symlink)."""
    executable = sys.executable or "python"
    try:
        executable = Path(executable).relative_to(Path.cwd()).as_posix()
    except ValueError:
        pass
    return _shell_quote(executable)


def _shell_quote(text: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./:=@%+-]+", text):
        return text
    return "'" + text.replace("'", "'\\''") + "'"


def _held(endpoint: Endpoint) -> dict[str, dict] | None:
    """What the embedded server holds, by data source (None when it cannot say)."""
    try:
        endpoint.server.flush()
        return dict(endpoint.server.datasources())
    except Exception:
        _LOG.debug("could not read the local server's data sources", exc_info=True)
        return None


def _datasources_of_run(summary: RunSummary, config: SinkConfig) -> list[str]:
    """The data sources this run sent to: the one named, or those the per-data-source counters saw."""
    if config.datasource is not None:
        return [config.datasource]
    return sorted(summary.by_datasource, key=lambda name: (-summary.by_datasource[name].rows_acknowledged, name))


def format_summary(summary: RunSummary, *, title: str, config: SinkConfig, endpoint: Endpoint,
                   dead_letter_path: str | None, replay_hint: bool = True) -> str:
    """The text printed at the end of a run."""
    def n(value: int) -> str:
        return f"{value:,}"

    datasources = _datasources_of_run(summary, config)
    if config.datasource is not None:
        quarantine_note = f"   (in {config.datasource}_quarantine)"
    else:
        quarantine_note = "   (in each data source's <name>_quarantine)"
    lines = [
        f"{title}: finished in {summary.elapsed_secs:.1f} s, {config.describe_destination()} at {endpoint.api_url}",
        f"  rows read            {n(summary.rows_read):>10}",
        f"  rows acknowledged    {n(summary.rows_acknowledged):>10}",
        f"  rows quarantined     {n(summary.rows_quarantined):>10}"
        + (quarantine_note if summary.rows_quarantined else "")
        + ("" if config.wait else "   (counted only with --wait: a 202 answer need not count them)"),
        f"  rows stored          {n(summary.rows_stored):>10}   (acknowledged - quarantined)",
    ]
    kinds = ", ".join(f"{kind}: {n(count)}" for kind, count in summary.dead_letters_by_kind.items())
    lines.append(f"  dead letters         {n(summary.dead_letters):>10}" + (f"   ({kinds})" if kinds else ""))
    for name, value in sorted(summary.extra.items()):
        lines.append(f"  {name.replace('_', ' '):<20} {n(value):>10}")
    lines.append(f"  requests (retries)   {n(summary.requests):>10}   ({n(summary.retries)} retries)")
    if config.routed:
        lines += _by_datasource_lines(summary, datasources)
    if dead_letter_path:
        shown = display_path(dead_letter_path)
        if summary.dead_letter_files:
            lines.append(f"  dead-letter files in {shown}:")
            lines.extend(f"    {display_path(path)}" for path in summary.dead_letter_files)
        else:
            lines.append(f"  dead-letter files in {shown}: none written")
    elif summary.dead_letters:
        lines.append("  dead letters were not written to files: pass --dead_letter_path")
    if endpoint.server is not None and endpoint.data_dir is not None:
        lines += _embedded_server_lines(summary, endpoint, datasources, routed=config.routed)
    replayable = summary.dead_letters - summary.lineless_dead_letters
    if replay_hint and dead_letter_path and replayable > 0:
        source, replayed = replay_paths(dead_letter_path, label=config.dead_letter_label)
        command = [
            f"{_python_command()} -m pipelines.replay_dead_letters",
            f"--input {_shell_quote(source)}",
        ]
        if config.datasource is not None:
            command.append(f"--datasource {config.datasource}")
        command.append(f"--dead_letter_path {_shell_quote(replayed)}")
        if not config.embedded:
            command.append(f"--api_url {config.api_url}")
        lines += ["", "Resend the dead letters once their cause is fixed:", "  " + " ".join(command)]
        if config.datasource is None:
            lines.append("  (each line goes back to the data source its record names; "
                         "those that name none need --datasource NAME)")
    if summary.failure is not None:
        lines += ["", f"FAILED: {summary.failure}"]
    return "\n".join(lines) + "\n"


def _by_datasource_lines(summary: RunSummary, datasources: Sequence[str]) -> list[str]:
    """One line per data source of a routed run (the first :data:`MAX_DATASOURCES_SHOWN`)."""
    if not datasources:
        return ["  by data source: none (no row was acknowledged or dead-lettered with a data source name)"]
    width = max(20, *(len(name) for name in datasources[:MAX_DATASOURCES_SHOWN]))
    lines = [f"  by data source ({len(datasources):,}):",
             f"    {'':<{width}} {'acknowledged':>12} {'dead letters':>12}"]
    for name in datasources[:MAX_DATASOURCES_SHOWN]:
        figures = summary.by_datasource.get(name, DatasourceFigures())
        lines.append(f"    {name:<{width}} {figures.rows_acknowledged:>12,} {figures.dead_letters:>12,}")
    hidden = datasources[MAX_DATASOURCES_SHOWN:]
    if hidden:
        acknowledged = sum(summary.by_datasource[name].rows_acknowledged for name in hidden)
        dead = sum(summary.by_datasource[name].dead_letters for name in hidden)
        label = f"({len(hidden):,} more)"
        lines.append(f"    {label:<{width}} {acknowledged:>12,} {dead:>12,}")
    unnamed = summary.dead_letters - sum(figures.dead_letters for figures in summary.by_datasource.values())
    if unnamed > 0:
        lines.append(f"    {'(no data source)':<{width}} {0:>12,} {unnamed:>12,}")
    return lines


def _embedded_server_lines(summary: RunSummary, endpoint: Endpoint, datasources: Sequence[str], *,
                           routed: bool) -> list[str]:
    """What the embedded server holds for each data source of the run, and how to look at it."""
    data_dir = display_path(str(endpoint.data_dir))
    held = _held(endpoint)
    # A routed run shows only the names the server knows: an unroutable element may have named anything.
    present = [name for name in datasources if name in (held or {})] if routed else list(datasources)
    lines = []
    for name in present[:MAX_DATASOURCES_SHOWN] if held is not None else ():
        info = (held or {}).get(name) or {}
        lines.append(f"  {name} now holds {int(info.get('rows', 0)):,} rows "
                     f"({int(info.get('quarantined', 0)):,} quarantined) in {data_dir}")
    if not present:
        # Nothing of this run's is there to look at (a replay whose lines all failed again
        # before any reached a data source): no heading over no commands.
        return lines
    # The embedded server stops with the job; its data stays in data_dir.
    python = _python_command()
    sql = f"{python} -m tinybird_emulator sql --data-dir {_shell_quote(data_dir)}"
    lines += ["", "Look at the data (read-only, straight from the data dir; no server needed):"]
    lines += [f"  {sql} \"SELECT count(*) FROM {name}\"" for name in present[:MAX_SQL_HINTS]]
    if routed:
        quarantined = [name for name in present if int(((held or {}).get(name) or {}).get("quarantined", 0))]
    else:
        quarantined = list(present) if summary.rows_quarantined else []
    lines += [f"  {sql} \"SELECT c__error_column, c__error FROM {name}_quarantine LIMIT 5\""
              for name in quarantined[:MAX_SQL_HINTS]]
    lines.append(f"Or serve it again: {python} -m tinybird_emulator serve --data-dir {_shell_quote(data_dir)} --port 7181")
    return lines
