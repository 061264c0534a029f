"""How fast a worker process posts to one data source: one :class:`Limiter` per (API host,
data source, token) per process, shared by every client, DoFn instance and thread.

A data source's rate limit is global: every worker of every job shares it. Each
worker can only see the answers to its own requests, so each process keeps one
limiter per target that three things in it obey:

- **the server's pause**: ``Retry-After`` on a 429/503 and an exhausted window
  (``X-RateLimit-Remaining: 0`` until ``X-RateLimit-Reset``) stop every request
  of the process at once, not only the one that was told;
- **a paced rate**, from the first *congestion answer* on. When answers come
  close together (a process sending several a second), two answers of one
  window measure the service's rate, every process's requests together (the
  requests counted between them over the time between them), and each process
  moves its rate by the same factor towards :data:`TARGET_LOAD` of
  ``X-RateLimit-Limit``, plus :data:`RATE_GROWTH_OF_LIMIT` of the limit per
  second (at least :data:`RATE_GROWTH_MIN_RPS`) for every process alike, while
  each answer to a request counted late in its window slows it by
  :data:`SPENT_WINDOW_DECREASE` (a process sending more meets more of them):
  both even out the shares, the limit is filled without a 429 to find it, and
  what finished processes leave is taken up within seconds. A window spent to
  a 429 ends the measurement (the rates before it are of processes all told to
  wait), and so does a new ``X-RateLimit-Limit``. When answers are sparse, AIMD (as TCP and Beam's
  ``AdaptiveThrottler`` react to overload on the client side): a congestion
  answer is a 429 or an answer whose ``X-RateLimit-Remaining`` says less than
  :data:`WINDOW_SPENT_SHARE` of the window was left when the request was
  counted (a signal before the 429),
  and multiplies the rate by :data:`RATE_DECREASE_RATIO` (at most once per
  round trip), so that a process sending more slows down more and the
  processes drift to equal shares; clean answers make it grow by
  :data:`RATE_GROWTH_PER_SEC` of itself and :data:`RATE_GROWTH_OF_LIMIT` of
  the limit (at least :data:`RATE_GROWTH_MIN_RPS`) per second, up to
  :data:`HEADROOM_GROWTH` times faster while the headers show the service far
  from its limit. A 429 always slows down. The
  spacing, and the pauses of a process that paces itself, are jittered so that
  processes do not move in step;
- **adaptive concurrency** (Vector's adaptive request concurrency): one
  request in flight at first, doubled each clean round trip (slow start); then the
  requests in flight shrink by :data:`DECREASE_RATIO` when an interval of one
  mean round trip saw back-pressure (429, 503, a timeout) or a round trip far
  above its moving average, and grow by one when the limit was used and
  answers were fast and clean; between 1 and ``max_in_flight``.

The :class:`Limiter` itself never sleeps and reads no clock: every call takes
``now``, so the discrete-event simulation (``benchmarks/throttling_simulation.py``)
drives the very same code with a fake clock. :func:`shared_limiter` is the
process's registry: created lazily, thread-safe, never pickled, bounded (the
least recently used limiter past :data:`MAX_SHARED_LIMITERS` is dropped), keyed
on a hash of the token (the token itself is neither stored nor logged).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import hashlib
import math
import threading
from collections.abc import Callable

__all__ = [
    "DECREASE_RATIO",
    "EWMA_ALPHA",
    "HEADROOM_GROWTH",
    "MAX_SHARED_LIMITERS",
    "MIN_RATE_RPS",
    "OTHER_LIMIT_SECS",
    "PAUSE_JITTER",
    "RATE_DECREASE_RATIO",
    "RATE_GROWTH_MIN_RPS",
    "RATE_GROWTH_OF_LIMIT",
    "RATE_GROWTH_PER_SEC",
    "RTT_DEVIATION_SCALE",
    "SPENT_WINDOW_DECREASE",
    "STEER_GAIN",
    "TARGET_LOAD",
    "WINDOW_SPENT_SHARE",
    "Admission",
    "Limiter",
    "LimiterKey",
    "RateWindow",
    "Signal",
    "shared_limiter",
]

DECREASE_RATIO = 0.9
"""Vector's ``decrease_ratio``: the concurrency limit after back-pressure, as a share of before."""
EWMA_ALPHA = 0.4
"""Vector's ``ewma_alpha``: weight of the newest interval in the moving round-trip average."""
RTT_DEVIATION_SCALE = 2.5
"""Vector's ``rtt_deviation_scale``: a round trip above mean + this many deviations is back-pressure."""
RATE_DECREASE_RATIO = 0.8
"""The paced rate after a congestion answer, as a share of before (applied on every
such answer to a request sent after the last decrease). Tuned with the simulation:
0.5 makes shares uneven (a process's rate jumps too far), 0.9 follows a halved
capacity too slowly (30-40 s of 429s)."""
RATE_GROWTH_PER_SEC = 0.01
"""Growth of the paced rate per second while answers are clean, as a share of it,
when the service is at its limit (see :data:`HEADROOM_GROWTH`)."""
RATE_GROWTH_OF_LIMIT = 0.0003
"""Growth of the paced rate per second, as a share of ``X-RateLimit-Limit``: the
same for every process, so a process below its share catches up faster (in
proportion) than one above it (the additive part of additive increase,
multiplicative decrease, also when steering to a measured rate)."""
RATE_GROWTH_MIN_RPS = 0.02
"""The least additive growth of the paced rate, in requests per second per second
(a tenth of :data:`MIN_RATE_RPS`), whatever the limit. The additive part is what
evens the shares out (growth and decrease by a factor keep their ratios), and
:data:`RATE_GROWTH_OF_LIMIT` of a small limit is next to nothing: 0.0015 at 5
requests/s, where 8 processes' fair shares are 0.6 each, so the processes ended
far apart and the last ones left the limit half used. Tuned with the simulation:
8 workers at 5 requests/s took 1.26-1.36x the ideal time without it (seeds 1 to 4)
and 1.09-1.24x with it (seeds 1 to 8), with 17-21% of requests answered 429
instead of 14-15% (0.015 gave 1.11-1.25x, seeds 1 to 6). It changes nothing from a limit
of 67 requests/s up, and after 100 requests/s halve to 50 it slows the return
under 10% 429s from 20-25 s to 20-30 s (seeds 1 to 4)."""
HEADROOM_GROWTH = 10.0
"""The share growth is multiplied by up to 1 + this while the service is far from
its limit: 11 times at no load, so that a process left alone by the others
(a backfill's last worker) doubles its rate in about 6 s rather than 70 s."""
WINDOW_SPENT_SHARE = 0.15
"""An answer with ``X-RateLimit-Remaining`` (plus the request itself) below this share of
``X-RateLimit-Limit`` says the window is nearly spent: a congestion answer, like
a 429 but before one, so that processes slow down while requests still pass.
Lower, and 100 processes at 100 requests/s meet more 429s; higher, and the
service's capacity is used less (at 1,000 requests/s)."""
SPENT_WINDOW_DECREASE = 0.97
"""While a process steers to a measured rate, each answer to a request counted in
the last :data:`WINDOW_SPENT_SHARE` of its window (of the requests the window
takes) multiplies its paced rate by this. Those requests are a share of every
process's requests, so a process sending twice as many slows down twice as
often: the shares even out faster than by the additive step alone (two processes
at 20 and 5 requests/s, steering at the target: a ratio of 1.9 after 15 s, against
2.55), and the slowing down takes back the additive step's growth, which
otherwise kept the service above :data:`TARGET_LOAD`, its windows overflowing
every few seconds into 429s that pause up to a third of the processes for a
second. In the simulation at 1,000 requests/s (100 workers, ``--seeds 1-24``)
the capacity used went from 86.0-93.8% to 92.2-92.5%, and the workers' shares
from 0.34-2.62x to 0.61-1.59x of the fair one. 0.95 (tried with a threshold
two requests lower) used 90.7-90.9%, and 89.2-90.6% when the 1,000 requests/s
halve to 500 (seeds 1 to 8)."""
PAUSE_JITTER = 0.5
"""A pause of a process that paces itself is lengthened by a random share of it up
to this, so that the processes told to wait the same second do not all come back
at its end."""
MIN_RATE_RPS = 0.2
"""The paced rate never falls below one request per 5 s: a burst of 429s must not
leave the process waiting minutes for its first request after the burst."""
TARGET_LOAD = 0.92
"""The share of ``X-RateLimit-Limit`` the processes steer to when they measure the
service's rate. Tuned with the simulation: 0.95 lets the fixed one-second
windows overflow now and then, and each 429 pauses its process for the whole
``Retry-After`` (one second: ten requests of a process sending ten a second);
0.90 leaves capacity unused."""
STEER_GAIN = 0.5
"""How fast the paced rate moves towards :data:`TARGET_LOAD`: the log of
(target / measured load) times this, per second (so a service at half its
target doubles the rates in about 1.4 s, at most x2 per second)."""
OTHER_LIMIT_SECS = 30.0
"""After a 429 with requests left in the window (a byte limit, not the request
count, binds), the measured request rate is steered to :data:`TARGET_LOAD` of the
requests that window had counted (``X-RateLimit-Limit`` minus ``-Remaining``: those
that fitted) rather than of ``X-RateLimit-Limit``, for this long. In the simulation
at 20 MB/s (400 requests/s of 1,000), 89.4-90.5% of the capacity used and 3.1-3.3%
429s (seeds 1 to 4), against 80.5-81.9% and 5.8-6.0% when it stopped steering
for this long."""
_MAX_LOG_STEER = math.log(4.0)
_SENT_WINDOW_SECS = 5.0
_USED_WINDOW_SECS = 3.0
# Two answers further apart may be of two windows even when the count did not fall
# back; and the rate is measured once pairs cover this much of the last seconds.
_PAIR_MAX_GAP_SECS = 0.5
_PAIRS_ENOUGH_SECS = 0.5
MIN_INTERVAL_SECS = 0.05
"""The shortest adjustment interval of the concurrency limit (answers on loopback take ~1 ms)."""


class Signal(enum.Enum):
    """What one answer says about the service's load."""

    OK = "ok"
    """Accepted, or refused for a reason that is not load (4xx other than 429)."""
    THROTTLED = "throttled"
    """429, or 503 with ``Retry-After``: slow down, nothing was stored."""
    BACK_PRESSURE = "back_pressure"
    """A timeout, a reset or a 5xx: not a "slow down", but a sign of overload."""


@dataclasses.dataclass(frozen=True)
class LimiterKey:
    """What a limiter is shared by: the API host, the data source and a digest of the token."""

    api_url: str
    datasource: str
    token_digest: str

    @classmethod
    def of(cls, *, api_url: str, datasource: str, token: str) -> LimiterKey:
        # Two tokens of one workspace share the data source's limit too, but two
        # workspaces' data sources of one name do not: keying on the token keeps
        # them apart. Only a digest is kept, so the registry never holds the token.
        digest = hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]
        return cls(api_url=api_url, datasource=datasource, token_digest=digest)


@dataclasses.dataclass(frozen=True)
class Admission:
    """The answer of :meth:`Limiter.admit`.

    Attributes:
        admitted: A slot was taken: send now, and call :meth:`Limiter.done` after.
        wait_secs: When not admitted, how long to wait before asking again;
            ``math.inf`` when waiting for a request in flight to end.
        reason: ``"pause"`` (the server's), ``"pace"`` (the paced rate),
            ``"concurrency"`` (the limit is reached), or ``""`` when admitted.
        not_before: For a pause, when it ends (a caller that already waited for
            this very pause goes ahead, so that a clock that does not move cannot spin).
        throttled: The wait is the service's doing (a pause, the paced rate, a
            concurrency limit lowered below ``max_in_flight``), not other
            requests of the process using every slot: it counts as throttled.
    """

    admitted: bool
    wait_secs: float = 0.0
    reason: str = ""
    not_before: float = -math.inf
    throttled: bool = False


@dataclasses.dataclass(frozen=True)
class RateWindow:
    """What an answer's ``X-RateLimit-Limit`` and ``X-RateLimit-Remaining`` say."""

    limit: float
    remaining: float

    @property
    def nearly_spent(self) -> bool:
        """Less than :data:`WINDOW_SPENT_SHARE` of the window's requests were left when this one was counted.

        Counted before the request, not after: the request that takes a window's
        last slot filled it exactly, which is the aim, not an overflow. With a
        small limit (under 7 requests a window) only a 429 then says "slow down";
        otherwise every full window would slow a process down, and the processes
        together would settle well below the limit (8 simulated processes sharing
        5 requests/s took 1.48x the ideal time counting after the request, and
        1.26-1.36x counting before it, seeds 1 to 4).
        """
        return self.nearly_spent_of(self.limit)

    def nearly_spent_of(self, requests: float) -> bool:
        """More than 1 - :data:`WINDOW_SPENT_SHARE` of ``requests`` (what the window takes) had been
        counted when this request was: :attr:`nearly_spent` with another limit than the header's."""
        return self.limit - self.remaining - 1 > (1.0 - WINDOW_SPENT_SHARE) * requests


_ADMITTED = Admission(admitted=True)


class Limiter:
    """The pause, throttle and concurrency limit one process applies to one target; thread-safe.

    Args:
        max_in_flight: The ceiling of the concurrency limit (which starts there).
        rand: Uniform random numbers in [0, 1), for the jitter.
        slow_start: Begin with one request in flight, doubled each clean round
            trip up to ``max_in_flight`` (``False``: begin at ``max_in_flight``).
    """

    def __init__(self, *, max_in_flight: int, rand: Callable[[], float], slow_start: bool = True) -> None:
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
        self._rand = rand
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        self._max = max_in_flight
        # Slow start (as TCP and Vector's adaptive concurrency begin): one request
        # in flight, doubled each clean round trip up to the ceiling, so that a
        # process starting against a spent limit meets one 429, not max_in_flight.
        self._limit = 1 if slow_start else max_in_flight
        self._slow_start = slow_start and max_in_flight > 1
        self._in_flight = 0
        self._not_before = -math.inf
        # Paced rate (None until the first congestion answer), the next send it
        # allows, when it last grew, and the process's own sending rate.
        self._rate: float | None = None
        self._next_send_at = -math.inf
        self._grown_at = -math.inf
        self._limit_seen = 0.0
        self._used: float | None = None
        self._used_at = -math.inf
        # The service's consumption measured between two answers of one window:
        # decaying sums of the requests it counted in between and of the time.
        self._last_count: tuple[float, float, float] | None = None
        self._counted = 0.0
        self._counted_secs = 0.0
        self._counted_at = -math.inf
        self._other_limit_until = -math.inf
        self._effective_limit = 0.0
        self._decreased_at = -math.inf
        self._sent = _DecayingRate(_SENT_WINDOW_SECS)
        # Adaptive concurrency: the moving round trip, and the interval under way.
        self._rtt_mean: float | None = None
        self._rtt_var = 0.0
        self._interval_end: float | None = None
        self._interval_rtt_sum = 0.0
        self._interval_rtt_n = 0
        self._interval_pressure = False
        self._interval_full = False

    def __repr__(self) -> str:
        return f"Limiter(limit={self._limit}, max_in_flight={self._max}, in_flight={self._in_flight})"

    def __getstate__(self) -> object:
        raise TypeError("a Limiter belongs to one worker process and cannot be pickled")

    @property
    def concurrency_limit(self) -> int:
        """The current concurrency limit (1 to ``max_in_flight``)."""
        return self._limit

    @property
    def max_in_flight(self) -> int:
        return self._max

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet done."""
        return self._in_flight

    @property
    def paced_rate_rps(self) -> float | None:
        """The paced rate (requests per second), or ``None`` before any congestion answer."""
        return self._rate

    def raise_ceiling(self, max_in_flight: int) -> None:
        """A second transform on the same target may allow more in flight: the larger ceiling wins."""
        with self._lock:
            if max_in_flight > self._max:
                self._limit += max_in_flight - self._max
                self._max = max_in_flight
                self._released.notify_all()

    def pause_remaining(self, now: float) -> float:
        """What is left of the server's pause (0 when there is none)."""
        with self._lock:
            return max(0.0, self._not_before - now)

    def admit(self, now: float, *, waited_for: float | None = None) -> Admission:
        """Whether a request may start now; if so, it takes a slot.

        Args:
            now: The caller's monotonic clock.
            waited_for: The ``not_before`` of a pause this caller already slept
                through: that pause no longer holds it back.
        """
        with self._lock:
            if self._not_before > now and self._not_before != waited_for:
                return Admission(admitted=False, wait_secs=self._not_before - now, reason="pause",
                                 not_before=self._not_before, throttled=True)
            if self._in_flight >= self._limit:
                self._interval_full = True
                # Waiting for another request of the process is throttling only
                # when back-pressure lowered the limit below the ceiling.
                return Admission(admitted=False, wait_secs=math.inf, reason="concurrency",
                                 throttled=self._limit < self._max and not self._slow_start)
            if self._rate is not None and self._next_send_at > now:
                return Admission(admitted=False, wait_secs=self._next_send_at - now, reason="pace", throttled=True)
            if self._rate is not None:
                # Jittered spacing: processes paced alike do not send in step.
                self._next_send_at = now + (0.5 + self._rand()) / self._rate
            self._sent.add(now)
            self._in_flight += 1
            if self._in_flight >= self._limit:
                self._interval_full = True
            return _ADMITTED

    def done(
        self, now: float, *, signal: Signal, rtt_secs: float, pause_secs: float = 0.0,
        window: RateWindow | None = None, sent_at: float | None = None,
    ) -> None:
        """A request admitted earlier ended: free its slot and learn from its answer.

        Args:
            now: The caller's monotonic clock.
            signal: What the answer says about load.
            rtt_secs: Its round trip.
            pause_secs: A pause every request of the process takes from now
                (``Retry-After``, or until an exhausted window resets).
            window: The service's ``X-RateLimit-Limit`` and ``-Remaining``, if it said.
            sent_at: When it was admitted: a congestion answer to a request sent
                before the last decrease does not decrease the rate again.
        """
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            if pause_secs > 0:
                # Once the process paces itself (it has met congestion before), its
                # pauses are lengthened by up to PAUSE_JITTER, so that processes told
                # to wait the same second do not all come back at its end; a first
                # pause is exactly the server's.
                jitter = 0.0 if self._rate is None else PAUSE_JITTER * self._rand()
                self._not_before = max(self._not_before, now + pause_secs * (1.0 + jitter))
                if window is None or window.remaining <= 0:
                    # A spent window ends the measurement: the rate measured before it
                    # is of processes that are all being told to wait. At a job's start,
                    # 100 workers measured twice the limit in the first half second,
                    # and steering from it held the service at 70-80% for 5 s.
                    self._counted = self._counted_secs = 0.0
                    self._last_count = None
            if window is not None:
                self._limit_seen = window.limit
                self._observe(now, window, now if sent_at is None else sent_at)
            if signal is Signal.THROTTLED and window is not None and window.remaining > 0:
                # Refused with requests left in the window: another limit (bytes)
                # binds, and the requests the window took before it are how far to go.
                self._other_limit_until = now + OTHER_LIMIT_SECS
                self._effective_limit = window.limit - window.remaining
            measured = self._measured_load(now)
            congested = signal is Signal.THROTTLED or (
                measured is None and window is not None and window.nearly_spent)
            if congested:
                # At most once per round trip (as TCP halves once per window): the
                # answers to requests sent before the last decrease say nothing new.
                if sent_at is None or sent_at >= self._decreased_at:
                    self._slow_down(now)
                    self._decreased_at = now
            elif signal is Signal.OK and measured is not None:
                self._steer(now, measured)
                if self._rate is not None and window is not None and window.nearly_spent_of(self._window_limit(now)):
                    self._rate = max(MIN_RATE_RPS, self._rate * SPENT_WINDOW_DECREASE)
            elif signal is Signal.OK and self._rate is not None:
                self._speed_up(now)
            self._adjust_concurrency(now, signal, rtt_secs)
            self._released.notify_all()

    def wait_for_slot(self, timeout_secs: float) -> None:
        """Blocks (really) until a request in flight ends or ``timeout_secs`` pass."""
        with self._lock:
            if self._in_flight >= self._limit:
                self._released.wait(timeout=max(0.0, timeout_secs))

    # -- internals (called with the lock held) ------------------------------------

    def _slow_down(self, now: float) -> None:
        # From the rate really sent when below the paced one (a process that was
        # idle, or not paced yet, slows down from what it sends).
        sent = self._sent.rate(now)
        current = sent if self._rate is None else min(self._rate, max(sent, MIN_RATE_RPS))
        self._rate = max(MIN_RATE_RPS, RATE_DECREASE_RATIO * current)
        self._grown_at = now

    def _observe(self, now: float, window: RateWindow, counted_at: float) -> None:
        # The share of the window used before this request was counted (plus half
        # of it, so that a small limit is not overestimated), averaged over the
        # last seconds: requests land at random points of the window, so the
        # average says how loaded the service is (half used: fully loaded).
        spent = window.limit - min(window.remaining, window.limit)
        used = min(1.0, max(0.0, (spent - 0.5) / window.limit))
        weight = 1.0 - math.exp(-max(now - self._used_at, 0.0) / _USED_WINDOW_SECS)
        self._used = used if self._used is None else self._used + weight * (used - self._used)
        self._used_at = now
        # Two answers close in time whose counts did not fall back are of one
        # window: the requests counted between them, over the time between them,
        # is the service's rate (every process's), read without knowing where
        # the window begins. A new limit starts a new measure: the requests
        # counted under the old one are read against it no longer (one lying
        # answer, a limit of 1e308, would otherwise weigh on it for half an hour).
        if self._last_count is not None and window.limit != self._last_count[2]:
            self._counted = self._counted_secs = 0.0
            self._last_count = None
        if self._last_count is not None:
            last_at, last_spent, _ = self._last_count
            gap, more = counted_at - last_at, spent - last_spent
            if gap < 0:
                gap, more = -gap, -more
            if 0 < gap <= _PAIR_MAX_GAP_SECS and more >= 0:
                decay = math.exp(-max(now - self._counted_at, 0.0) / _USED_WINDOW_SECS)
                self._counted = self._counted * decay + more
                self._counted_secs = self._counted_secs * decay + gap
                self._counted_at = now
            if counted_at < last_at:
                return
        self._last_count = (counted_at, spent, window.limit)

    def _measured_load(self, now: float) -> float | None:
        """The service's load (its requests per second over its limit) measured from pairs of
        answers of one window, or ``None`` when too few answers came close enough together."""
        decay = math.exp(-max(now - self._counted_at, 0.0) / _USED_WINDOW_SECS)
        limit = self._window_limit(now)
        if self._counted_secs * decay < _PAIRS_ENOUGH_SECS or limit <= 0:
            return None
        load = self._counted / self._counted_secs / limit
        # Absurd headers (an X-RateLimit-Limit of 1e308, whose counts sum past float's range, or a
        # window of 1e-310 requests) make an infinite or NaN load: that measures nothing.
        return load if math.isfinite(load) else None

    def _headroom(self) -> float:
        """1 - the load estimated from the average share of the window used (0 when at or over the limit, or unknown)."""
        if self._used is None:
            return 0.0
        load = 2.0 * self._used if self._used <= 0.5 else 0.5 / max(1.0 - self._used, 1e-9)
        return max(0.0, 1.0 - load)

    def _steer(self, now: float, load: float) -> None:
        # The headers measure the load of the service (every process's requests),
        # so each process moves its rate by the same factor towards TARGET_LOAD:
        # together they fill the limit without a 429 to find it, and what a
        # finished process leaves is taken up within seconds.
        if self._rate is None:
            if load > TARGET_LOAD:
                self._rate = max(MIN_RATE_RPS, self._sent.rate(now) * TARGET_LOAD / max(load, 1e-9))
                self._grown_at = now
            return
        elapsed = min(max(now - self._grown_at, 0.0), 2.0 / self._rate)
        self._grown_at = now
        step = STEER_GAIN * elapsed * max(-_MAX_LOG_STEER, min(_MAX_LOG_STEER, math.log(TARGET_LOAD / max(load, 1e-9))))
        # Only a rate the process uses grows: an idle one would otherwise come
        # back from a lull far above what the service accepts.
        if self._sent.rate(now) < 0.5 * self._rate:
            step = min(step, 0.0)
            elapsed = 0.0
        # The same share of the limit for every process: the processes above
        # their share shrink by more than they gain, those below it the reverse,
        # so the shares even out (additive increase, multiplicative decrease).
        self._rate = max(MIN_RATE_RPS, self._rate * math.exp(step) + self._additive_growth() * elapsed)

    def _speed_up(self, now: float) -> None:
        assert self._rate is not None
        # Growth for the time since the last answer, up to two paced intervals:
        # a slow process grows per second as fast as a quick one.
        elapsed = min(max(now - self._grown_at, 0.0), 2.0 / self._rate)
        self._grown_at = now
        # Only a rate the process uses grows: an idle one would otherwise come
        # back from a lull far above what the service accepts.
        if self._sent.rate(now) >= 0.5 * self._rate:
            growth = RATE_GROWTH_PER_SEC * (1.0 + HEADROOM_GROWTH * self._headroom())
            self._rate = self._rate * math.exp(growth * elapsed) + self._additive_growth() * elapsed

    def _window_limit(self, now: float) -> float:
        """The requests a window takes: ``X-RateLimit-Limit``, or for :data:`OTHER_LIMIT_SECS` after a
        429 with requests left (another limit binds), the requests the window had counted then."""
        return self._effective_limit if now < self._other_limit_until else self._limit_seen

    def _additive_growth(self) -> float:
        """The additive part of the paced rate's growth, in requests per second per second: a share of
        ``X-RateLimit-Limit`` even while another limit binds (of the requests that fitted it, a step
        too small to even the shares out: 0.57-2.19x of the fair share in the simulation at 20 MB/s,
        against 0.62-1.79x, seeds 1 to 4)."""
        return max(RATE_GROWTH_OF_LIMIT * self._limit_seen, RATE_GROWTH_MIN_RPS)

    def _adjust_concurrency(self, now: float, signal: Signal, rtt_secs: float) -> None:
        if signal is not Signal.OK:
            self._interval_pressure = True
        self._interval_rtt_sum += rtt_secs
        self._interval_rtt_n += 1
        if self._interval_end is None:
            self._interval_end = now + self._interval_secs()
            return
        if now < self._interval_end:
            return
        current = self._interval_rtt_sum / self._interval_rtt_n if self._interval_rtt_n else None
        mean = self._rtt_mean
        slow = (mean is not None and current is not None
                and current > mean + RTT_DEVIATION_SCALE * math.sqrt(self._rtt_var))
        if self._interval_pressure or slow:
            self._limit = max(1, math.floor(self._limit * DECREASE_RATIO))
            self._slow_start = False
        elif self._interval_full and (mean is None or current is None or current <= mean):
            self._limit = min(self._max, 2 * self._limit if self._slow_start else self._limit + 1)
            self._slow_start = self._slow_start and self._limit < self._max
        if current is not None:
            if mean is None:
                self._rtt_mean = current
            else:
                diff = current - mean
                self._rtt_mean = mean + EWMA_ALPHA * diff
                self._rtt_var = (1 - EWMA_ALPHA) * (self._rtt_var + EWMA_ALPHA * diff * diff)
        self._interval_rtt_sum, self._interval_rtt_n = 0.0, 0
        self._interval_pressure = False
        self._interval_full = self._in_flight >= self._limit
        self._interval_end = now + self._interval_secs()

    def _interval_secs(self) -> float:
        # One mean round trip, jittered so that processes do not adjust in step.
        base = max(self._rtt_mean or 0.0, MIN_INTERVAL_SECS)
        return base * (0.75 + 0.5 * self._rand())


class _DecayingRate:
    """Events per second over an exponentially decaying window (corrected while
    the window is not yet full, so that the first seconds are not underestimated)."""

    def __init__(self, window_secs: float) -> None:
        self._window = window_secs
        self._count = 0.0
        self._first: float | None = None
        self._last = 0.0

    def add(self, now: float) -> None:
        self._decay(now)
        self._count += 1.0

    def rate(self, now: float) -> float:
        self._decay(now)
        if self._first is None:
            return 0.0
        # Over at least one second: a few requests sent at once are not a rate.
        covered = 1.0 - math.exp(-max(now - self._first, 1.0) / self._window)
        return self._count / (self._window * covered)

    def _decay(self, now: float) -> None:
        if self._first is None:
            self._first = self._last = now
        elif now > self._last:
            self._count *= math.exp(-(now - self._last) / self._window)
            self._last = now


MAX_SHARED_LIMITERS = 10_000
"""The limiters a process keeps (about 2 KB each: some 21 MB at the bound). A data source function
that names data sources without bound would otherwise grow the registry with every name; past the
bound, the least recently used limiter with nothing in flight is dropped, and its data source, if
it comes back, starts over as at a job's start (its learned rate is lost, never a row; a batch that
still holds the dropped one, waiting to retry, finishes with it)."""

_REGISTRY: collections.OrderedDict[LimiterKey, tuple[Limiter, Callable[[], float]]] = collections.OrderedDict()
_REGISTRY_LOCK = threading.Lock()


def shared_limiter(
    key: LimiterKey, *, max_in_flight: int, clock: Callable[[], float], rand: Callable[[], float],
) -> Limiter:
    """The process's limiter for ``key``, created on first use (at most :data:`MAX_SHARED_LIMITERS` are kept).

    Limiters are shared by callers that share a clock (in production, every
    client of the process reads ``time.monotonic``): a caller with another
    clock (a test's fake one) replaces the entry, since the times a limiter
    holds mean nothing on another clock.
    """
    with _REGISTRY_LOCK:
        entry = _REGISTRY.get(key)
        if entry is not None and entry[1] == clock:
            _REGISTRY.move_to_end(key)
            entry[0].raise_ceiling(max_in_flight)
            return entry[0]
        limiter = Limiter(max_in_flight=max_in_flight, rand=rand)
        _REGISTRY[key] = (limiter, clock)
        _REGISTRY.move_to_end(key)
        if len(_REGISTRY) > MAX_SHARED_LIMITERS:
            # The least recently used one that no request is using (in practice the first).
            idle = next((k for k, (other, _) in _REGISTRY.items() if k != key and other.in_flight == 0), None)
            if idle is not None:
                del _REGISTRY[idle]
        return limiter
