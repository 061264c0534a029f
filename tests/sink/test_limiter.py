"""The process's shared Limiter (sinks/tinybird/_http/limiter.py) with an injected clock: every
call takes ``now``, and the random numbers are fixed or seeded, so the numbers are exact."""

from __future__ import annotations

import collections
import math
import pickle
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sinks.tinybird._http.classify import rate_window
from sinks.tinybird._http.limiter import (
    MIN_RATE_RPS,
    OTHER_LIMIT_SECS,
    PAUSE_JITTER,
    RATE_GROWTH_MIN_RPS,
    SPENT_WINDOW_DECREASE,
    Limiter,
    LimiterKey,
    RateWindow,
    Signal,
    shared_limiter,
)


def _half() -> float:
    return 0.5


def _sent_rate(sends: list[float], now: float) -> float:
    """What the limiter measures as the sent rate: a count decaying over 5 s, over at least 1 s."""
    count = sum(math.exp(-(now - t) / 5.0) for t in sends)
    return count / (5.0 * (1.0 - math.exp(-max(now - sends[0], 1.0) / 5.0)))


def test_unpaced_until_the_first_congestion_answer_and_bounded_by_max_in_flight():
    limiter = Limiter(max_in_flight=2, rand=_half, slow_start=False)
    assert limiter.admit(0.0).admitted and limiter.admit(0.0).admitted
    third = limiter.admit(0.0)
    # Both slots taken by the process's own requests, at the ceiling: not throttling.
    assert (third.admitted, third.reason, third.wait_secs, third.throttled) == (False, "concurrency", math.inf, False)
    limiter.done(0.03, signal=Signal.OK, rtt_secs=0.03, sent_at=0.0)
    assert limiter.admit(0.03).admitted


def test_a_429_pauses_the_process_exactly_the_first_time_and_starts_pacing():
    limiter = Limiter(max_in_flight=4, rand=_half)
    assert limiter.admit(10.0).admitted
    limiter.done(10.1, signal=Signal.THROTTLED, rtt_secs=0.1, pause_secs=1.0, sent_at=10.0)
    paused = limiter.admit(10.5)
    assert (paused.admitted, paused.reason, paused.throttled) == (False, "pause", True)
    assert paused.not_before == 11.1
    assert paused.wait_secs == pytest.approx(0.6)
    # One request sent in 0.1 s, measured over 1 s: 0.98020 / (5 x 0.18127) = 1.08148 requests/s; x 0.8.
    assert limiter.paced_rate_rps == pytest.approx(0.8 * _sent_rate([10.0], 10.1)) == pytest.approx(0.86519, abs=1e-5)
    # The caller that slept through this very pause goes ahead.
    assert limiter.admit(11.1, waited_for=11.1).admitted


def test_pacing_spaces_requests_by_the_jittered_interval():
    limiter = Limiter(max_in_flight=4, rand=_half, slow_start=False)
    limiter.admit(0.0)
    limiter.done(0.1, signal=Signal.THROTTLED, rtt_secs=0.1, sent_at=0.0)
    rate = limiter.paced_rate_rps
    assert rate is not None
    assert limiter.admit(0.1).admitted
    # rand 0.5: the spacing is (0.5 + 0.5) / rate, exactly one interval.
    paced = limiter.admit(0.2)
    assert (paced.admitted, paced.reason, paced.throttled) == (False, "pace", True)
    assert paced.wait_secs == pytest.approx(0.1 + 1.0 / rate - 0.2)


def test_the_jitter_comes_from_the_injected_random():
    draws = random.Random(7)
    expected = random.Random(7)
    limiter = Limiter(max_in_flight=4, rand=draws.random, slow_start=False)
    limiter.admit(0.0)
    limiter.done(0.1, signal=Signal.THROTTLED, rtt_secs=0.1, sent_at=0.0)
    expected.random()  # the first concurrency interval's jitter
    rate = limiter.paced_rate_rps
    assert rate is not None
    assert limiter.admit(0.1).admitted
    spacing = (0.5 + expected.random()) / rate
    assert limiter.admit(0.1).wait_secs == pytest.approx(spacing)


def test_a_paced_process_lengthens_its_pauses_by_the_jitter():
    limiter = Limiter(max_in_flight=4, rand=_half)
    limiter.admit(0.0)
    limiter.done(0.1, signal=Signal.THROTTLED, rtt_secs=0.1, sent_at=0.0)
    limiter.admit(5.0)
    limiter.done(5.1, signal=Signal.THROTTLED, rtt_secs=0.1, pause_secs=1.0, sent_at=5.0)
    # 1 s x (1 + 0.5 x 0.5).
    assert limiter.pause_remaining(5.1) == pytest.approx(1.25)


def test_the_rate_decreases_once_per_round_trip():
    limiter = Limiter(max_in_flight=4, rand=_half, slow_start=False)
    for _ in range(3):
        limiter.admit(0.0)
    limiter.done(0.1, signal=Signal.THROTTLED, rtt_secs=0.1, sent_at=0.0)
    first = limiter.paced_rate_rps
    # Two more 429s to requests sent before that decrease: no new information.
    limiter.done(0.12, signal=Signal.THROTTLED, rtt_secs=0.12, sent_at=0.0)
    limiter.done(0.15, signal=Signal.THROTTLED, rtt_secs=0.15, sent_at=0.0)
    assert limiter.paced_rate_rps == first
    # One sent after it does: x 0.8 again, of the rate really sent when that is lower
    # (4 requests, 3 of them 3 s ago: 1.13 requests/s against a paced 2.59).
    limiter.admit(3.0)
    limiter.done(3.1, signal=Signal.THROTTLED, rtt_secs=0.1, sent_at=3.0)
    assert first == pytest.approx(0.8 * _sent_rate([0.0, 0.0, 0.0], 0.1)) == pytest.approx(2.5956, abs=1e-4)
    assert limiter.paced_rate_rps == pytest.approx(0.8 * _sent_rate([0.0, 0.0, 0.0, 3.0], 3.1))
    assert limiter.paced_rate_rps == pytest.approx(0.8983, abs=1e-4)
    assert MIN_RATE_RPS < 0.8983


def test_slow_start_begins_with_one_request_and_doubles_each_clean_round_trip():
    limiter = Limiter(max_in_flight=4, rand=_half)
    assert limiter.admit(0.0).admitted
    first_wait = limiter.admit(0.0)
    # Held by its own request while starting: not throttling.
    assert (first_wait.admitted, first_wait.reason, first_wait.throttled) == (False, "concurrency", False)
    limiter.done(0.01, signal=Signal.OK, rtt_secs=0.01, sent_at=0.0)  # opens the first interval, to 0.06
    assert limiter.admit(0.05).admitted
    limiter.done(0.07, signal=Signal.OK, rtt_secs=0.01, sent_at=0.05)  # full and fast: 1 -> 2
    assert limiter.concurrency_limit == 2
    for _ in range(2):
        assert limiter.admit(0.08).admitted
    limiter.done(0.09, signal=Signal.OK, rtt_secs=0.01, sent_at=0.08)
    limiter.done(0.13, signal=Signal.OK, rtt_secs=0.01, sent_at=0.08)  # 2 -> 4, the ceiling
    assert limiter.concurrency_limit == 4


def test_a_nearly_spent_window_slows_down_like_a_429_without_pausing():
    # Less than 15% of the window left when the request was counted (Remaining is after it).
    assert RateWindow(limit=100, remaining=13).nearly_spent
    assert not RateWindow(limit=100, remaining=14).nearly_spent
    # The request that takes a small window's last slot filled it: not a signal to slow down.
    assert not RateWindow(limit=5, remaining=0).nearly_spent
    assert RateWindow(limit=7, remaining=0).nearly_spent
    limiter = Limiter(max_in_flight=4, rand=_half)
    limiter.admit(0.0)
    # One answer: too few to measure the service's rate, so the threshold is the signal.
    limiter.done(0.1, signal=Signal.OK, rtt_secs=0.1, window=RateWindow(limit=100, remaining=13), sent_at=0.0)
    assert limiter.paced_rate_rps == pytest.approx(0.8 * _sent_rate([0.0], 0.1))
    assert limiter.pause_remaining(0.1) == 0.0
    # Against another limit than the header's: the share is of the requests that window takes.
    assert RateWindow(limit=1000, remaining=600).nearly_spent_of(400)
    assert not RateWindow(limit=1000, remaining=700).nearly_spent_of(400)


def test_the_rate_grows_per_second_with_the_headroom_the_headers_show():
    limiter = Limiter(max_in_flight=4, rand=_half)
    limiter.admit(0.0)
    limiter.done(0.1, signal=Signal.THROTTLED, rtt_secs=0.1, sent_at=0.0)
    rate0 = limiter.paced_rate_rps
    assert rate0 is not None
    # Clean answer 1 s later, no headers: 1% per second, plus the least additive growth.
    limiter.admit(1.0)
    limiter.done(1.1, signal=Signal.OK, rtt_secs=0.1, sent_at=1.0)
    rate1 = limiter.paced_rate_rps
    assert rate1 == pytest.approx(rate0 * math.exp(0.01 * 1.0) + RATE_GROWTH_MIN_RPS * 1.0)
    # An empty window (Remaining = Limit = 1,000): headroom 1, so 11% per second,
    # plus 0.03% of the limit per second (more than the least).
    limiter.admit(2.0)
    limiter.done(2.1, signal=Signal.OK, rtt_secs=0.1, window=RateWindow(limit=1000, remaining=1000), sent_at=2.0)
    rate2 = limiter.paced_rate_rps
    assert rate2 == pytest.approx(rate1 * math.exp(0.11 * 1.0) + 0.0003 * 1000 * 1.0)
    # A small limit (5 requests/s): 0.03% of it would be 0.0015 requests/s per second; the least is 0.02.
    limiter.admit(3.0)
    limiter.done(3.1, signal=Signal.OK, rtt_secs=0.1, window=RateWindow(limit=5, remaining=5), sent_at=3.0)
    assert RATE_GROWTH_MIN_RPS == 0.02
    assert limiter.paced_rate_rps == pytest.approx(rate2 * math.exp(0.11 * 1.0) + 0.02 * 1.0)


def test_the_additive_growth_evens_out_two_processes_that_the_multiplicative_growth_would_not():
    # Two processes paced at 0.2 and 1.0 requests/s, answered cleanly once a second
    # for 20 s under a small limit: growth by the same factor alone keeps the ratio at
    # 5; the additive part (the same for both) brings it down.
    slow, fast = Limiter(max_in_flight=4, rand=_half), Limiter(max_in_flight=4, rand=_half)
    for limiter, rate in ((slow, 0.2), (fast, 1.0)):
        limiter.admit(0.0)
        limiter.done(0.1, signal=Signal.THROTTLED, rtt_secs=0.1, sent_at=0.0)
        limiter._rate = rate
    for second in range(1, 21):
        for limiter in (slow, fast):
            limiter._sent.add(float(second))  # it sends what it is paced at, or near enough
            limiter.done(second + 0.05, signal=Signal.OK, rtt_secs=0.05,
                         window=RateWindow(limit=5, remaining=1), sent_at=float(second))
    ratio = fast.paced_rate_rps / slow.paced_rate_rps
    assert 1.0 < ratio < 3.0


def test_an_idle_process_does_not_grow_its_rate():
    limiter = Limiter(max_in_flight=4, rand=_half)
    limiter.admit(0.0)
    limiter.done(0.1, signal=Signal.THROTTLED, rtt_secs=0.1, sent_at=0.0)
    rate0 = limiter.paced_rate_rps
    # 60 s later it sends one request: its sent rate is far below its paced rate.
    limiter.admit(60.0)
    limiter.done(60.1, signal=Signal.OK, rtt_secs=0.1, sent_at=60.0)
    assert limiter.paced_rate_rps == rate0


def test_back_pressure_lowers_the_concurrency_limit_and_waiting_on_it_is_throttling():
    limiter = Limiter(max_in_flight=4, rand=_half, slow_start=False)
    # Intervals are one mean round trip, at least 50 ms (x 0.75-1.25 jitter: 0.5 gives 1).
    limiter.admit(0.0)
    limiter.done(0.01, signal=Signal.OK, rtt_secs=0.01, sent_at=0.0)  # opens the first interval, to 0.06
    limiter.admit(0.05)
    limiter.done(0.07, signal=Signal.BACK_PRESSURE, rtt_secs=0.02, sent_at=0.05)
    assert limiter.concurrency_limit == 3  # floor(4 x 0.9)
    for _ in range(3):
        assert limiter.admit(0.08).admitted
    waiting = limiter.admit(0.08)
    # Three in flight of a limit lowered below max_in_flight=4: the service's doing.
    assert (waiting.reason, waiting.throttled) == ("concurrency", True)


def test_the_concurrency_limit_grows_by_one_when_it_was_used_and_answers_were_fast():
    limiter = Limiter(max_in_flight=4, rand=_half, slow_start=False)
    limiter.admit(0.0)
    limiter.done(0.01, signal=Signal.BACK_PRESSURE, rtt_secs=0.01, sent_at=0.0)  # first interval, to 0.06
    limiter.admit(0.05)
    limiter.done(0.07, signal=Signal.BACK_PRESSURE, rtt_secs=0.01, sent_at=0.05)
    assert limiter.concurrency_limit == 3
    # The next interval (mean round trip 0.01 s, so 50 ms): all 3 slots used, answers as fast.
    for _ in range(3):
        assert limiter.admit(0.08).admitted
    limiter.done(0.09, signal=Signal.OK, rtt_secs=0.01, sent_at=0.08)
    limiter.done(0.10, signal=Signal.OK, rtt_secs=0.01, sent_at=0.08)
    limiter.done(0.13, signal=Signal.OK, rtt_secs=0.01, sent_at=0.08)
    assert limiter.concurrency_limit == 4


def test_shared_limiter_is_one_per_key_and_clock_and_never_pickled():
    key = LimiterKey.of(api_url="http://127.0.0.1:1", datasource="events", token="p.secret")
    assert "p.secret" not in repr(key) and len(key.token_digest) == 16

    def clock() -> float:
        return 0.0

    first = shared_limiter(key, max_in_flight=2, clock=clock, rand=_half)
    again = shared_limiter(key, max_in_flight=4, clock=clock, rand=_half)
    assert again is first and first.max_in_flight == 4
    other = LimiterKey.of(api_url="http://127.0.0.1:1", datasource="events", token="p.other")
    assert shared_limiter(other, max_in_flight=2, clock=clock, rand=_half) is not first
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(first)


def _answers_of_one_service(limiter: Limiter, *, service_rps: float, own_rps: float, secs: float,
                            limit: int = 1000, start: float = 0.0) -> float:
    """Feeds the limiter the answers a fixed one-second-window service counting
    ``service_rps`` requests (its own ``own_rps`` among them, evenly spread) would give; returns the end."""
    t = start
    while t < start + secs:
        spent = min(limit, math.floor((t - math.floor(t)) * service_rps) + 1)
        limiter.admit(t)
        limiter.done(t + 0.01, signal=Signal.OK, rtt_secs=0.01, window=RateWindow(limit=limit, remaining=limit - spent),
                     sent_at=t)
        t += 1.0 / own_rps
    return t


def test_the_service_rate_is_measured_between_answers_of_one_window():
    # 10 answers a second of a service counting 500 requests/s: half its limit.
    limiter = Limiter(max_in_flight=4, rand=_half, slow_start=False)
    now = _answers_of_one_service(limiter, service_rps=500, own_rps=10, secs=5)
    assert limiter._measured_load(now) == pytest.approx(0.5, abs=0.01)


def test_a_process_paces_itself_before_the_first_429_when_the_service_is_near_its_limit():
    limiter = Limiter(max_in_flight=4, rand=_half, slow_start=False)
    _answers_of_one_service(limiter, service_rps=990, own_rps=10, secs=3)
    # Measured at ~0.99 of the limit: paced at its own rate x TARGET_LOAD / load, with no 429 met.
    rate = limiter.paced_rate_rps
    assert rate is not None and 6.0 < rate < 10.0
    assert limiter.pause_remaining(3.0) == 0.0


def test_a_429_with_requests_left_makes_the_requests_that_fitted_the_limit_to_steer_to():
    # A byte limit binds: the service counts 390 requests a window of the header's 1,000 and
    # refuses some with requests left (Remaining 600: 400 fitted). For OTHER_LIMIT_SECS the
    # process reads the load against those 400, not the header's 1,000 (at 390 of 1,000 it
    # would see room to grow 2.4 times, and grow until the next 429).
    told, untold = (Limiter(max_in_flight=4, rand=_half, slow_start=False) for _ in range(2))
    for limiter in (told, untold):
        end = _answers_of_one_service(limiter, service_rps=390, own_rps=10, secs=2)
    # "untold" met no such 429: it paces itself from the measured 39% of the header's limit.
    told.admit(end)
    told.done(end + 0.01, signal=Signal.THROTTLED, rtt_secs=0.01, pause_secs=0.5,
              window=RateWindow(limit=1000, remaining=600), sent_at=end)
    assert told._measured_load(end + 0.01) == pytest.approx(390 / 400, rel=0.05)
    assert untold._measured_load(end + 0.01) == pytest.approx(0.39, rel=0.05)
    for limiter in (told, untold):
        _answers_of_one_service(limiter, service_rps=390, own_rps=10, secs=5, start=end + 1.0)
    assert told.paced_rate_rps is not None and told.paced_rate_rps < 10.0
    assert told._measured_load(end + 6.0) == pytest.approx(390 / 400, rel=0.05)
    # Past OTHER_LIMIT_SECS the header's limit is what the load is read against again.
    later = end + 1.0 + OTHER_LIMIT_SECS
    _answers_of_one_service(told, service_rps=390, own_rps=10, secs=2, start=later)
    assert told._measured_load(later + 2) == pytest.approx(0.39, rel=0.05)


def test_a_paced_process_takes_up_what_the_others_leave_within_seconds():
    limiter = Limiter(max_in_flight=4, rand=_half, slow_start=False)
    end = _answers_of_one_service(limiter, service_rps=990, own_rps=10, secs=3)
    before = limiter.paced_rate_rps
    assert before is not None
    # The others stop: the service counts only this process's 10 requests/s.
    _answers_of_one_service(limiter, service_rps=10, own_rps=10, secs=8, start=end)
    # It grows up to twice what it really sends (10/s here, once its sending rate, measured
    # over 5 s, has caught up from the 6 it was admitted to send): a rate it does not use stays put.
    after = limiter.paced_rate_rps
    assert after is not None and after > 2 * before and after == pytest.approx(20.0, rel=0.15)


def _paced_senders(limiters: list[Limiter], *, service_rps: float, secs: float, limit: int = 1000) -> None:
    """Each limiter sends whenever it admits a request, to a fixed one-second-window service
    counting ``service_rps`` requests evenly spread (every process's together)."""
    steps = round(secs / 0.001)
    for step in range(steps):
        t = step * 0.001
        for limiter in limiters:
            if limiter.admit(t).admitted:
                spent = min(limit, math.floor((t - math.floor(t)) * service_rps) + 1)
                limiter.done(t + 0.01, signal=Signal.OK, rtt_secs=0.01,
                             window=RateWindow(limit=limit, remaining=limit - spent), sent_at=t)


@pytest.mark.parametrize("decrease, ratio_between", [(SPENT_WINDOW_DECREASE, (1.0, 2.2)), (1.0, (2.4, 4.0))])
def test_answers_late_in_a_window_even_out_the_shares_of_processes_that_steer(monkeypatch, decrease, ratio_between):
    # Two processes paced at 20 and 5 requests/s, the service at its target load: the steering
    # factor is the same for both and keeps their ratio of 4. Their answers to requests counted
    # after 85% of the window's limit are a share of their requests, so the faster one slows down
    # 4 times as often: after 15 s the ratio is 1.9. Without it (decrease 1.0), the additive step
    # alone: 2.55.
    monkeypatch.setattr("sinks.tinybird._http.limiter.SPENT_WINDOW_DECREASE", decrease)
    fast, slow = (Limiter(max_in_flight=4, rand=_half, slow_start=False) for _ in range(2))
    for limiter, rate in ((fast, 20.0), (slow, 5.0)):
        limiter.admit(0.0)
        limiter.done(0.01, signal=Signal.THROTTLED, rtt_secs=0.01, sent_at=0.0)
        limiter._rate = rate
    _paced_senders([fast, slow], service_rps=920, secs=15)
    assert fast.paced_rate_rps is not None and slow.paced_rate_rps is not None
    low, high = ratio_between
    assert low < fast.paced_rate_rps / slow.paced_rate_rps < high


def test_a_pause_from_a_spent_window_ends_the_measurement_and_one_from_another_limit_does_not():
    # Both processes measured the service at 99% of its limit.
    spent, other = (Limiter(max_in_flight=4, rand=_half, slow_start=False) for _ in range(2))
    for limiter in (spent, other):
        end = _answers_of_one_service(limiter, service_rps=990, own_rps=10, secs=3)
        assert limiter._measured_load(end) == pytest.approx(0.99, abs=0.02)
        limiter.admit(end)
    # A 429 with nothing left: every process is told to wait, and what they sent before says
    # nothing of what they will send after. One with requests left (a byte limit) keeps it.
    spent.done(end + 0.01, signal=Signal.THROTTLED, rtt_secs=0.01, pause_secs=1.0,
               window=RateWindow(limit=1000, remaining=0), sent_at=end)
    other.done(end + 0.01, signal=Signal.THROTTLED, rtt_secs=0.01, pause_secs=1.0,
               window=RateWindow(limit=1000, remaining=10), sent_at=end)
    assert spent._measured_load(end + 0.01) is None
    assert other._measured_load(end + 0.01) is not None
    # After the pause, the first answers of one window measure the service anew.
    after = _answers_of_one_service(spent, service_rps=500, own_rps=10, secs=1, start=end + 1.0)
    assert spent._measured_load(after) == pytest.approx(0.5, abs=0.02)


def test_shared_limiters_are_bounded_dropping_the_least_recently_used_idle_one(monkeypatch):
    """Issue 23: a data source function naming data sources without bound must not grow the registry
    without bound. Past the bound the least recently used limiter goes, never one with a request in
    flight; a key used again is recent again."""
    import sinks.tinybird._http.limiter as limiter_module

    monkeypatch.setattr(limiter_module, "_REGISTRY", collections.OrderedDict())
    monkeypatch.setattr(limiter_module, "MAX_SHARED_LIMITERS", 3)

    def clock() -> float:
        return 0.0

    def key(name: str) -> LimiterKey:
        return LimiterKey.of(api_url="http://127.0.0.1:1", datasource=name, token="p.secret")

    def get(name: str) -> Limiter:
        return shared_limiter(key(name), max_in_flight=2, clock=clock, rand=_half)

    busy, a, b = get("busy"), get("a"), get("b")
    assert busy.admit(0.0).admitted  # a request in flight: never dropped
    assert get("a") is a  # "a" is now more recent than "b"
    get("c")  # over the bound: "busy" is the oldest but in flight, so the next oldest, "b", goes
    assert list(limiter_module._REGISTRY) == [key("busy"), key("a"), key("c")]
    assert get("busy") is busy and get("a") is a
    assert get("b") is not b  # dropped: it starts over (and "c", now the oldest, goes)
    assert list(limiter_module._REGISTRY) == [key("busy"), key("a"), key("b")]
    busy.done(0.1, signal=Signal.OK, rtt_secs=0.1)
    get("d")  # "busy" is idle now, and the least recently used
    assert list(limiter_module._REGISTRY) == [key("a"), key("b"), key("d")]


def test_a_hundred_thousand_data_sources_keep_the_registry_at_its_bound():
    """At scale and at the real bound: 100,000 names, each used once, leave MAX_SHARED_LIMITERS
    limiters, the most recent ones; and a limiter that has seen answers holds under 4 KB (counted by
    tracemalloc over 1,000 of them: about 2 KB), so the registry's bound is some 21 MB."""
    import tracemalloc

    import sinks.tinybird._http.limiter as limiter_module

    def clock() -> float:
        return 0.0

    def use(name: str) -> None:
        limiter = shared_limiter(LimiterKey.of(api_url="http://127.0.0.1:1", datasource=name, token="p.t"),
                                 max_in_flight=4, clock=clock, rand=_half)
        assert limiter.admit(0.0).admitted
        limiter.done(0.01, signal=Signal.OK, rtt_secs=0.01, window=RateWindow(limit=100, remaining=50))

    saved = collections.OrderedDict(limiter_module._REGISTRY)
    limiter_module._REGISTRY.clear()
    try:
        for i in range(100_000):
            use(f"ev_{i}")
        names = [key.datasource for key in limiter_module._REGISTRY]
        limiter_module._REGISTRY.clear()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(1000):
                use(f"sized_{i}")
            per_limiter = (tracemalloc.get_traced_memory()[0] - before) / 1000
        finally:
            tracemalloc.stop()
    finally:
        limiter_module._REGISTRY.clear()
        limiter_module._REGISTRY.update(saved)
    bound = limiter_module.MAX_SHARED_LIMITERS
    assert names == [f"ev_{i}" for i in range(100_000 - bound, 100_000)]
    assert 500 < per_limiter < 4096, per_limiter


def _hostile_windows(kind: str) -> list[tuple[Signal, RateWindow]]:
    """Answers 0.1 s apart whose ``X-RateLimit-*`` headers passed :func:`rate_window` (finite, a limit
    above 0, nothing negative) but are absurd: what a lying proxy or a broken gateway may send."""
    if kind == "enormous limit":  # counts of one window that sum past float's range
        return [(Signal.OK, RateWindow(limit=1e308, remaining=1e308 if i % 2 else 0.0)) for i in range(12)]
    if kind == "largest float limit":
        top = sys.float_info.max
        return [(Signal.OK, RateWindow(limit=top, remaining=top if i % 2 else 0.0)) for i in range(12)]
    # A 429 with requests left in a window of 1e-310 requests: the requests that fitted it (the
    # limit the load is read against for OTHER_LIMIT_SECS) are next to zero.
    return [(Signal.THROTTLED, RateWindow(limit=1e-310, remaining=5e-311))] + [
        (Signal.OK, RateWindow(limit=1000, remaining=500 - i)) for i in range(10)]


@pytest.mark.parametrize("kind", ["enormous limit", "largest float limit", "a window of next to no requests"])
def test_absurd_rate_limit_numbers_never_raise_nor_leave_a_rate_that_is_not_a_number(kind):
    # The process first measures a service at 99% of its limit (so it steers by a measured load).
    limiter = Limiter(max_in_flight=4, rand=_half, slow_start=False)
    now = _answers_of_one_service(limiter, service_rps=990, own_rps=10, secs=3)
    for signal, window in _hostile_windows(kind):
        admission = limiter.admit(now)
        if not admission.admitted:
            assert math.isfinite(admission.wait_secs) and admission.wait_secs >= 0, admission
            now += admission.wait_secs
            assert limiter.admit(now, waited_for=admission.not_before).admitted
        limiter.done(now + 0.01, signal=signal, rtt_secs=0.01, window=window, sent_at=now,
                     pause_secs=0.5 if signal is Signal.THROTTLED else 0.0)
        load = limiter._measured_load(now + 0.01)
        assert load is None or math.isfinite(load), load
        rate = limiter.paced_rate_rps
        assert rate is not None and math.isfinite(rate) and rate >= MIN_RATE_RPS, rate
        now += 0.1
    # Still usable: the next request is admitted within the slowest pacing (a request per
    # 1 / MIN_RATE_RPS s, jittered by up to 1.5 times) or the 0.5 s pause.
    later = now + 1.5 / MIN_RATE_RPS
    assert limiter.admit(later).admitted


@pytest.mark.parametrize("lying", [[0.0], [1e308, 0.0], [0.0, 1e308]], ids=["one answer", "a pair", "a pair, spent first"])
def test_answers_with_a_lying_limit_leave_the_measure_of_the_service_within_seconds(lying):
    """A new X-RateLimit-Limit starts a new measure: one or two answers of a lying proxy (a limit of
    1e308) between honest ones leave the measured load as it was a few seconds later, instead of
    counting 1e308 requests against the honest limit until they decay (about half an hour)."""
    limiter = Limiter(max_in_flight=4, rand=_half, slow_start=False)
    now = _answers_of_one_service(limiter, service_rps=500, own_rps=10, secs=5)
    for remaining in lying:
        limiter.admit(now)
        limiter.done(now + 0.01, signal=Signal.OK, rtt_secs=0.01, window=RateWindow(limit=1e308, remaining=remaining),
                     sent_at=now)
        now += 0.1
    now = _answers_of_one_service(limiter, service_rps=500, own_rps=10, secs=3, start=now)
    assert limiter._measured_load(now) == pytest.approx(0.5, abs=0.02)


# Header values a broken gateway or a lying proxy may send: every float rate_window lets through
# (finite, a limit above 0, nothing negative), the extremes most of all, and the remaining count
# often a share of the limit (so that answers close together measure a "window" of it).
_LIMITS = st.sampled_from(["1", "5", "1000", "1e-310", "5e-324", "1e308", "1.7976931348623157e308", "0", "-1",
                           "nan", "inf", "x"])
_ANSWERS = st.lists(st.tuples(
    st.sampled_from([0.0, 0.01, 0.1, 0.5, 3.0]),  # seconds since the last answer
    st.sampled_from(list(Signal)),
    _LIMITS,  # X-RateLimit-Limit
    st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(min_value=0.0, max_value=1.0),
              st.sampled_from(["", "-1", "nan", "1e308"])),  # X-RateLimit-Remaining: a share of the limit, or a value
    st.sampled_from([0.0, 0.001, 1.0, 120.0])), min_size=1, max_size=80)  # a pause (Retry-After, capped)


def _remaining(limit: str, remaining: float | str) -> str:
    if isinstance(remaining, str):
        return remaining
    try:
        return repr(float(limit) * remaining)
    except ValueError:
        return "0"


@settings(max_examples=500, deadline=None)
@given(answers=_ANSWERS)
def test_no_answer_headers_make_the_limiter_raise_or_leave_a_rate_or_a_wait_that_is_not_a_number(answers):
    """The whole class of the absurd-limit crash: whatever the headers (through ``rate_window``, as
    the client reads them), the limiter never raises, its paced rate stays finite and at least
    MIN_RATE_RPS, its concurrency within 1 and max_in_flight, and a process with nothing in flight
    is admitted after a finite wait (at most a pause and a paced interval)."""
    limiter = Limiter(max_in_flight=4, rand=_half)
    now = last_pause = 0.0
    for gap, signal, limit, remaining, pause in answers:
        waited = 0.0
        admission = limiter.admit(now)
        for _ in range(3):
            if admission.admitted:
                break
            assert math.isfinite(admission.wait_secs) and admission.wait_secs >= 0, admission
            waited += admission.wait_secs
            now += admission.wait_secs
            admission = limiter.admit(now, waited_for=admission.not_before)
        assert admission.admitted, admission
        # The last answer's pause (lengthened by at most PAUSE_JITTER), then at most a paced interval.
        assert waited <= last_pause * (1.0 + PAUSE_JITTER) + 1.0 / MIN_RATE_RPS + 1e-6, (waited, last_pause)
        last_pause = pause if signal is Signal.THROTTLED else 0.0
        window = rate_window({"X-RateLimit-Limit": limit, "X-RateLimit-Remaining": _remaining(limit, remaining)})
        now += gap
        limiter.done(now, signal=signal, rtt_secs=gap, pause_secs=last_pause, window=window, sent_at=now - gap)
        rate = limiter.paced_rate_rps
        assert rate is None or (math.isfinite(rate) and rate >= MIN_RATE_RPS), rate
        assert 1 <= limiter.concurrency_limit <= limiter.max_in_flight
