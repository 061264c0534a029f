"""The discrete-event simulation of 100 workers sharing one limit (benchmarks/throttling_simulation.py):
it drives the production Limiter and classify with a fake clock, so these checks are exact and quick."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from benchmarks.throttling_simulation import Scenario, _seed_range, _seeds_table, misses, run, standard_scenarios

_SCENARIOS = {s.name: s for s in standard_scenarios()}
STEADY = _SCENARIOS["100 workers, 100 req/s"]
BURSTS = _SCENARIOS["100 workers, 100 req/s, bursts"]
EIGHT = _SCENARIOS["8 workers, 5 req/s"]


# Seed 1 of every scenario the issue bounds (misses() in benchmarks/throttling_simulation.py says
# which bounds; `--seeds 1-24` counts the seeds that miss one). What each one exercises:
# - 100 req/s: about one answer a second per worker, too few to measure the service's rate: AIMD
#   on 429s and on nearly spent windows;
# - 100 -> 50 req/s: 429s back under 10% within 30 s of the halving;
# - bursts: batches arriving at random times; capacity is read against an ideal that knows them;
# - 1,000 req/s: dense answers: each worker measures the service's rate from pairs of answers of
#   one window and steers towards it, and answers late in a window even the shares out;
# - 1,000 -> 500 req/s: the first worker finishes before the halving (the span the capacity and
#   shares are read over ends there), so this checks the start, where all 100 workers meet a
#   spent window in the first half second (87.6% of the capacity and shares of 0.50-2.06x before
#   a spent window's pause ended the measurement and answers late in a window evened the shares);
# - 20 MB/s: 50 KB batches, 400 requests/s fit of the header's 1,000: a 429 with requests left
#   tells each worker how many fitted, and it steers to that (81% of the capacity before);
# - 8 workers, 5 req/s: the multi-process run (benchmarks/throttling_processes.py), simulated:
#   400 batches, ideal 80 s (1.29x without the least additive growth).
_BOUNDED = [s for s in standard_scenarios() if s.workers in (8, 100)]


@pytest.mark.parametrize("scenario", _BOUNDED, ids=[s.name for s in _BOUNDED])
def test_every_batch_is_delivered_once_and_the_run_meets_the_issues_bounds(scenario: Scenario):
    result = run(scenario)
    assert result.dead_letters == 0
    assert result.delivered == scenario.workers * scenario.batches_per_worker
    # Every accepted request is one delivered batch: none was accepted twice.
    assert result.requests - result.throttled == result.delivered
    if scenario.halve_at_secs is not None:
        assert result.recovery_secs is not None
    assert misses(result) == []


def test_bursts_are_sent_as_fast_as_an_ideal_sender_would():
    # The ideal knows when each burst arrives: a sender that keeps up with the
    # arrivals is done within a few seconds of it.
    result = run(BURSTS)
    assert result.wall_secs <= result.ideal_secs * 1.05


def test_misses_names_each_bound_a_run_misses_and_the_seeds_table_lists_them():
    eight = run(EIGHT)
    assert misses(eight) == []
    slow = dataclasses.replace(eight, wall_secs=1.3 * eight.ideal_secs, throttled=eight.requests // 2)
    assert misses(slow) == ["wall 1.30x", f"429 {100 * slow.share_429:.1f}%"]
    steady = run(STEADY)
    assert misses(steady) == []
    bad = dataclasses.replace(steady, capacity_used=0.85, worker_shares=(0.4, 1.0, 2.5), recovery_secs=40.0,
                              dead_letters=3)
    assert misses(bad) == ["3 dead letters", "capacity 85.0%", "shares 0.40-2.50x", "429s over 10% for 40 s"]
    # Four workers: the issue sets no bound for them.
    four = dataclasses.replace(bad, scenario=_SCENARIOS["4 workers, 5 req/s"])
    assert misses(four) == []
    table = _seeds_table([[steady, dataclasses.replace(bad, scenario=dataclasses.replace(STEADY, seed=7))]])
    low, high = min(steady.worker_shares), max(steady.worker_shares)
    assert table.splitlines()[2] == (
        f"| 100 workers, 100 req/s | 2 | {steady.wall_secs / steady.ideal_secs:.2f}x "
        f"| 85.0-{100 * steady.capacity_used:.1f}% | {100 * steady.share_429:.1f}% "
        f"| 0.40-{low:.2f}, {high:.2f}-2.50x | 40 s "
        "| 7 (3 dead letters, capacity 85.0%, shares 0.40-2.50x, 429s over 10% for 40 s) |")


def test_a_range_of_seeds_is_read_inclusively():
    assert _seed_range("1-24") == list(range(1, 25))
    assert _seed_range("5") == [5]
    with pytest.raises(argparse.ArgumentTypeError):
        _seed_range("9-3")
