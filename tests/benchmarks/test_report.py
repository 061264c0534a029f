"""The benchmark's targets: ratios of medians, and the same ratio round by round."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks._report import RunResult, evaluate_targets, paired_ratios, summarize
from benchmarks.scenarios import SCENARIOS

_BY_NAME = {s.name: s for s in SCENARIOS}


def _run(scenario: str, repeat: int, elapsed_secs: float, *, events: int = 1000) -> RunResult:
    return RunResult(
        scenario=scenario, repeat=repeat, events=events, ndjson_bytes=events * 200, elapsed_secs=elapsed_secs,
        cpu_secs=elapsed_secs, max_rss_bytes=1 << 20, server_cpu_secs=0.1, requests=1, non_2xx=0,
        lines_received=events, checksum_ok=True, rows_stored=None, distinct_events=None, quarantined=0,
        counted=None, ok=True, problem=None)


def test_each_round_compares_its_own_runs_and_rounds_missing_a_run_are_left_out():
    one = summarize(_BY_NAME["sink_zstd"], [_run("sink_zstd", r, t) for r, t in ((1, 1.0), (2, 2.0), (3, 1.0))])
    three = summarize(_BY_NAME["sink_zstd_3_destinations"], [
        _run("sink_zstd_3_destinations", 1, 1.25),
        _run("sink_zstd_3_destinations", 2, 2.0),
        dataclasses.replace(_run("sink_zstd_3_destinations", 3, 0.0), ok=False, problem="crashed"),
        _run("sink_zstd_3_destinations", 4, 1.0),  # no fourth run of sink_zstd
    ])

    assert paired_ratios(three, one) == pytest.approx((0.8, 1.0))


def test_the_target_line_shows_the_ratio_of_medians_and_the_rounds():
    # The medians are round 2's runs (0.85x); rounds 1 and 3 ran both scenarios faster, or slower,
    # and compare them at 0.95x and 0.92x.
    one = summarize(_BY_NAME["sink_zstd"], [_run("sink_zstd", r, t) for r, t in ((1, 0.8), (2, 1.0), (3, 1.2))])
    three = summarize(_BY_NAME["sink_zstd_3_destinations"],
                      [_run("sink_zstd_3_destinations", r, t) for r, t in ((1, 0.84), (2, 1.1765), (3, 1.3))])

    [target] = [t for t in evaluate_targets([one, three], max_batch_bytes=1 << 20)
                if t.description.startswith("sink_zstd_3_destinations / sink_zstd ")]

    assert target.value == pytest.approx(1.0 / 1.1765, rel=1e-4)
    assert target.paired == pytest.approx((0.8 / 0.84, 1.0 / 1.1765, 1.2 / 1.3), rel=1e-4)
    assert target.met is False  # judged by the ratio of medians, as before
    assert "round by round: median 0.92x (0.85-0.95x, 3 rounds)" in target.line()
