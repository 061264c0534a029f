"""The discrete-event simulation of 100 workers sharing one limit (benchmarks/throttling_simulation.py):
it drives the production Limiter and classify with a fake clock, so these checks are exact and quick."""

from __future__ import annotations

import pytest

from benchmarks.throttling_simulation import Scenario, run

STEADY = Scenario(name="100 workers, 100 req/s", workers=100, capacity_rps=100, batches_per_worker=60)
HALVING = Scenario(name="100 workers, 100 -> 50 req/s at 30 s", workers=100, capacity_rps=100,
                   batches_per_worker=60, halve_at_secs=30.0)


@pytest.mark.parametrize("scenario", [STEADY, HALVING], ids=["steady", "halving"])
def test_overload_never_dead_letters_and_every_batch_is_delivered_once(scenario):
    result = run(scenario)
    assert result.dead_letters == 0
    assert result.delivered == scenario.workers * scenario.batches_per_worker
    # Every accepted request is one delivered batch: none was accepted twice.
    assert result.requests - result.throttled == result.delivered


@pytest.mark.xfail(strict=True, reason=(
    "issue 22's bounds are not met yet by the limiter's tuning: measured 429 share 10-14% "
    "(bound 10%) and worker shares 0.4-2.2x (bound 0.5-2x) at 100 req/s; see the report"))
def test_the_issues_bounds_for_100_workers():
    steady, halving = run(STEADY), run(HALVING)
    assert steady.capacity_used >= 0.90
    assert steady.share_429 <= 0.10
    assert min(steady.worker_shares) >= 0.5 and max(steady.worker_shares) <= 2.0
    assert halving.recovery_secs is not None and halving.recovery_secs <= 30
