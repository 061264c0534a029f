"""Several worker processes, each its own Beam pipeline with the sink's default settings, against one
rate-limited local server (benchmarks/throttling_processes.py, issue 22's figure made smaller):
overload makes the job slower, never loses or dead-letters a row."""

from __future__ import annotations

from benchmarks.throttling_processes import run
from sinks.tinybird.retry import RetryPolicy

# The longest a worker may take is what its batches' budgets allow (errors, throttling,
# one attempt of the default 5 s connect + 30 s read timeouts), plus starting Beam.
_DEFAULTS = RetryPolicy()
_TIMEOUT_SECS = _DEFAULTS.max_total_secs + _DEFAULTS.max_throttled_secs + 35 + 120


def test_four_processes_share_a_global_limit_without_dead_letters_or_loss(tmp_path):
    figures = run(processes=4, rows=4000, rate_limit_rps=10, work_dir=tmp_path, timeout_secs=_TIMEOUT_SECS)
    assert figures.dead_letters == 0
    assert figures.lost == 0
    # Every id stored (the 429s stored nothing, so nothing was stored twice).
    assert figures.stored_ids == 4000 and figures.duplicates == 0
    assert figures.requests - figures.answered_429 == 40  # 100-row batches, each accepted once
    assert figures.share_429 <= 0.25
