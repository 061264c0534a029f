"""Results: one run's figures, the medians per scenario, the table and the targets."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence

from benchmarks.scenarios import Scenario

__all__ = ["RunResult", "Summary", "Target", "evaluate_targets", "extra_cpu_micros", "ratio_pairs", "render", "summarize"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunResult:
    """One run of one scenario, as measured by its worker and checked on the server.

    Attributes:
        cpu_secs: CPU time of the worker process (every thread) during the timed part.
        server_cpu_secs: CPU time of the process sent to (the counting endpoint or
            the local server) from the start of the run until everything it
            accepted was counted or committed.
        requests: ``/v0/events`` requests answered for the run's data source.
        non_2xx: Those answered with anything but 2xx (retried by the sink, or fatal).
        lines_received: Lines the counting endpoint received (None: not sent there).
        checksum_ok: Whether the sum of their CRC32 equals that of the lines sent.
        rows_stored: Rows in the run's data source on the local server after a
            flush (None: not sent there).
        distinct_events: Distinct ``event_id`` among them.
        counted: Elements the baseline's discard saw (None for senders).
        ok: Every event arrived exactly once (or, for a baseline, was seen).
        problem: Why not, when not ok.
    """

    scenario: str
    repeat: int
    events: int
    ndjson_bytes: int
    elapsed_secs: float
    cpu_secs: float
    max_rss_bytes: int
    server_cpu_secs: float
    requests: int
    non_2xx: int
    lines_received: int | None
    checksum_ok: bool | None
    rows_stored: int | None
    distinct_events: int | None
    quarantined: int
    counted: int | None
    ok: bool
    problem: str | None

    @property
    def events_per_sec(self) -> float:
        return self.events / self.elapsed_secs if self.elapsed_secs > 0 else 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Summary:
    """The median of a scenario's runs (runs that failed to run at all are left out)."""

    scenario: Scenario
    events: int
    ndjson_bytes: int
    runs: tuple[RunResult, ...]
    events_per_sec: float
    mb_per_sec: float
    requests: float
    cpu_secs: float
    server_cpu_secs: float
    max_rss_bytes: float
    spread: float
    ok: bool
    problems: tuple[str, ...]

    @property
    def mean_request_bytes(self) -> float | None:
        return self.ndjson_bytes / self.requests if self.requests else None


def summarize(scenario: Scenario, runs: Sequence[RunResult]) -> Summary:
    measured = [r for r in runs if r.elapsed_secs > 0]
    problems = tuple(f"run {r.repeat}: {r.problem}" for r in runs if not r.ok)
    if not measured:
        return Summary(
            scenario=scenario, events=runs[0].events if runs else 0, ndjson_bytes=0, runs=tuple(runs),
            events_per_sec=0.0, mb_per_sec=0.0, requests=0, cpu_secs=0.0, server_cpu_secs=0.0, max_rss_bytes=0,
            spread=0.0,
            ok=False, problems=problems or ("no run",))
    rates = [r.events_per_sec for r in measured]
    median_rate = statistics.median(rates)
    first = measured[0]
    return Summary(
        scenario=scenario,
        events=first.events,
        ndjson_bytes=first.ndjson_bytes,
        runs=tuple(runs),
        events_per_sec=median_rate,
        mb_per_sec=statistics.median(r.ndjson_bytes / r.elapsed_secs / 1e6 for r in measured),
        requests=statistics.median(r.requests for r in measured),
        cpu_secs=statistics.median(r.cpu_secs for r in measured),
        server_cpu_secs=statistics.median(r.server_cpu_secs for r in measured),
        max_rss_bytes=statistics.median(r.max_rss_bytes for r in measured),
        spread=(max(rates) - min(rates)) / median_rate if median_rate else 0.0,
        ok=not problems and len(measured) == len(runs),
        problems=problems,
    )


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}" if n < 100 * size else f"{n / size:,.0f} {unit}"
    return f"{n:,.0f} B"


def _baseline_for(summary: Summary, by_name: dict[str, Summary]) -> Summary | None:
    return by_name.get(summary.scenario.baseline)


def extra_cpu_micros(summary: Summary, by_name: dict[str, Summary]) -> float | None:
    """CPU microseconds per event above the baseline of the same mode (what the writing costs)."""
    base = _baseline_for(summary, by_name)
    if base is None or not base.events or not summary.events:
        return None
    return (summary.cpu_secs / summary.events - base.cpu_secs / base.events) * 1e6


def render(summaries: Sequence[Summary], *, max_batch_bytes: int) -> str:
    """The table (Markdown) of medians, with the ratio to the baseline of the same mode."""
    by_name = {s.scenario.name: s for s in summaries}
    header = (
        "| scenario | events | events/s | x baseline | MB/s | requests | mean request | "
        "of max_batch_bytes | CPU s | events/CPU-s | CPU us/event over baseline | peak RSS | server CPU s | "
        "spread | rows check |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for s in summaries:
        base = _baseline_for(s, by_name)
        ratio = "1.00" if base is s else (
            f"{s.events_per_sec / base.events_per_sec:.2f}" if base and base.events_per_sec else "-")
        sends = s.scenario.sends
        mean = s.mean_request_bytes if sends else None
        extra = extra_cpu_micros(s, by_name)
        check = "OK" if s.ok else "FAILED"
        if s.ok:
            check = "OK (seen)" if not sends else (
                "OK (rows stored)" if s.runs and s.runs[0].rows_stored is not None else "OK (lines, checksum)")
        lines.append(
            f"| {s.scenario.name}: {s.scenario.title} | {s.events:,} | {s.events_per_sec:,.0f} | {ratio} | "
            f"{s.mb_per_sec:.1f} | {f'{s.requests:,.0f}' if sends else '-'} | {_bytes(mean)} | "
            f"{f'{mean / max_batch_bytes:.1%}' if mean else '-'} | {s.cpu_secs:.2f} | "
            f"{s.events / s.cpu_secs if s.cpu_secs else 0:,.0f} | "
            f"{'-' if extra is None or base is s else f'{extra:+,.1f}'} | {_bytes(s.max_rss_bytes)} | "
            f"{f'{s.server_cpu_secs:.2f}' if sends else '-'} | "
            f"{s.spread:.0%} | {check} |"
        )
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Target:
    """One comparison: what, the measured value, the bar (None: shown, not judged), whether it is met."""

    description: str
    value: float
    threshold: float | None
    met: bool | None
    unit: str = "x"
    note: str = ""
    per_cpu_value: float | None = None
    extra_cpu_micros: tuple[float, float] | None = None
    aim: float | None = None
    paired: tuple[float, ...] = ()
    """The ratio in each round that ran both scenarios (``--repeats``: round r runs every
    scenario's r-th run, one after the other), so that each ratio compares runs minutes
    apart at most: the machine's load drifts less within a round than over a whole set."""

    def line(self) -> str:
        value = f"{self.value:.1%}" if self.unit == "%" else f"{self.value:.2f}x"
        per_cpu = "" if self.per_cpu_value is None else f"; per CPU-second of the pipeline: {self.per_cpu_value:.2f}x"
        if len(self.paired) > 1:
            per_cpu += (f"; round by round: median {statistics.median(self.paired):.2f}x "
                        f"({min(self.paired):.2f}-{max(self.paired):.2f}x, {len(self.paired)} rounds)")
        if self.extra_cpu_micros is not None:
            mine, theirs = self.extra_cpu_micros
            per_cpu += f"; CPU per event above the baseline: {mine:.1f} vs {theirs:.1f} us"
        note = f" ({self.note})" if self.note else ""
        if self.threshold is None:
            return f"- {self.description}: {value} (no target){per_cpu}{note}"
        bar = f"{self.threshold:.0%}" if self.unit == "%" else f"{self.threshold:g}x"
        if self.aim is not None:
            bar += f", aim {self.aim:g}x: {'reached' if self.value >= self.aim else 'not reached'}"
        return f"- {self.description}: {value} (target >= {bar}): {'met' if self.met else 'MISSED'}{per_cpu}{note}"


_BOUNDED_SINKS = ("sink_none", "sink_zstd", "sink_gzip")
# (scenario, its baseline, target, aim): the ratios of events/s that issue 17 asks for.
_BASELINE_TARGETS: tuple[tuple[str, str, float | None, float | None], ...] = (
    ("sink_none", "baseline", 0.85, 0.90),
    ("sink_zstd", "baseline", 0.80, None),
    ("sink_gzip", "baseline", None, None),
    ("sink_zstd_local_server", "baseline", None, None),
    ("sink_zstd_timestamped", "baseline_timestamped", None, None),
    ("sink_streaming", "baseline_streaming", 0.65, 0.75),
    ("sink_streaming_large", "baseline_streaming_large", 0.95, None),
)


# Issue 23: three data sources cost at most 10% over one.
_DESTINATION_TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("sink_zstd_3_destinations", "sink_zstd", 0.9, "sink_zstd_3_destinations / sink_zstd events/s"),
    ("sink_streaming_3_destinations", "sink_streaming", 0.9, "sink_streaming_3_destinations / sink_streaming events/s"),
)


# Its two parts (no target of their own): calling a function per element, and filling three batches
# instead of one (the function of sink_zstd_routed costs what the three-destination one does).
_DESTINATION_PARTS: tuple[tuple[str, str, None, str], ...] = (
    ("sink_zstd_routed", "sink_zstd", None, "sink_zstd_routed / sink_zstd events/s (a function per element)"),
    ("sink_zstd_3_destinations", "sink_zstd_routed", None,
     "sink_zstd_3_destinations / sink_zstd_routed events/s (three batches instead of one)"),
)


def paired_ratios(a: Summary, b: Summary) -> tuple[float, ...]:
    """``a``'s events/s over ``b``'s in each round (same repeat number) where both were measured."""
    b_rates = {r.repeat: r.events_per_sec for r in b.runs if r.elapsed_secs > 0}
    return tuple(r.events_per_sec / b_rates[r.repeat] for r in sorted(a.runs, key=lambda r: r.repeat)
                 if r.elapsed_secs > 0 and b_rates.get(r.repeat))


def ratio_pairs() -> list[tuple[str, str, float | None, str]]:
    """The pairs of scenarios the targets compare: (scenario, against, target or None, description)."""
    return [*((sink, base, threshold, f"{sink} / {base} events/s") for sink, base, threshold, _ in _BASELINE_TARGETS),
            *_DESTINATION_TARGETS, *_DESTINATION_PARTS]


def evaluate_targets(summaries: Sequence[Summary], *, max_batch_bytes: int) -> list[Target]:
    """The issues' targets, for the scenarios that ran."""
    by_name = {s.scenario.name: s for s in summaries}
    targets: list[Target] = []

    def ratio(a: str, b: str, threshold: float | None, description: str, note: str = "",
              aim: float | None = None) -> None:
        if a in by_name and b in by_name and by_name[b].events_per_sec:
            sa, sb = by_name[a], by_name[b]
            value = sa.events_per_sec / sb.events_per_sec
            per_cpu = None
            if sa.cpu_secs and sb.cpu_secs:
                per_cpu = (sa.events / sa.cpu_secs) / (sb.events / sb.cpu_secs)
            extra = None
            if sb.scenario.sends:
                ea, eb = extra_cpu_micros(sa, by_name), extra_cpu_micros(sb, by_name)
                if ea is not None and eb is not None:
                    extra = (ea, eb)
            met = None if threshold is None else value >= threshold
            targets.append(Target(description, value, threshold, met, note=note,
                                  per_cpu_value=per_cpu, extra_cpu_micros=extra, aim=aim,
                                  paired=paired_ratios(sa, sb)))

    for sink, base, threshold, aim in _BASELINE_TARGETS:
        note = ""
        if sink in by_name and base in by_name:
            extra = extra_cpu_micros(by_name[sink], by_name)
            note = f"CPU per event above the baseline: {extra:+.1f} us" if extra is not None else ""
        ratio(sink, base, threshold, f"{sink} / {base} events/s", note=note, aim=aim)
    for sink in _BOUNDED_SINKS:
        ratio(sink, "peer_b_batch_bytes", 1.0, f"{sink} / (b) BatchElements by bytes events/s")
    for sink in _BOUNDED_SINKS:
        if "peer_a_post_each" in by_name and sink in by_name:
            ratio(sink, "peer_a_post_each", 30.0, f"{sink} / (a) post per element events/s",
                  note=f"rates on {by_name[sink].events:,} vs {by_name['peer_a_post_each'].events:,} events")
    bounded_destinations, streaming_destinations = _DESTINATION_TARGETS
    function_part, batches_part = _DESTINATION_PARTS
    ratio(*bounded_destinations)
    ratio(*function_part)
    ratio(*batches_part)
    ratio(*streaming_destinations)
    ratio("sink_streaming", "peer_c_gib_streaming", 5.0,
          "sink_streaming / (c) GroupIntoBatches streaming events/s")
    if "sink_streaming" in by_name and "peer_c_gib" in by_name:
        ratio("sink_streaming", "peer_c_gib", 5.0,
              "sink_streaming / (c) GroupIntoBatches bounded events/s",
              note="different runners: streaming DirectRunner vs batch FnApiRunner")
    for sink in _BOUNDED_SINKS:
        s = by_name.get(sink)
        if s is None or not s.mean_request_bytes:
            continue
        batches = s.ndjson_bytes / max_batch_bytes
        value = s.mean_request_bytes / max_batch_bytes
        note = f"{batches:.1f} batches of input"
        if batches < 10:
            note += "; input not much larger than one batch, not a fair test"
        targets.append(Target(f"{sink} mean request size / max_batch_bytes", value, 0.9, value >= 0.9,
                              unit="%", note=note))
    return targets
