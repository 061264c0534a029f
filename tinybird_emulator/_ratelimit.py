"""Per-data-source rate limits: a fixed window counting requests and wire bytes.

The values reported in ``X-RateLimit-*`` headers come from here; ``Reset`` is the
number of seconds (a delta, rounded up) until the current window ends.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

__all__ = ["UNLIMITED_REPORTED_LIMIT", "RateDecision", "RateLimiter"]

# Reported as X-RateLimit-Limit when the request limit is lifted: a client that
# paces itself on the headers then never waits.
UNLIMITED_REPORTED_LIMIT = 1_000_000_000


@dataclasses.dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_secs: int
    retry_after_secs: int
    reason: str = ""

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_secs),
        }


class _Window:
    __slots__ = ("bytes", "requests", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.requests = 0
        self.bytes = 0


class RateLimiter:
    """Fixed windows per key (the data source name). Used from the event loop only."""

    def __init__(
        self,
        *,
        requests_per_window: float | None,
        bytes_per_window: int | None,
        window_secs: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rps = requests_per_window
        self._bps = bytes_per_window
        self._window_secs = window_secs
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._limit = (
            UNLIMITED_REPORTED_LIMIT if requests_per_window is None else max(1, int(requests_per_window))
        )

    def _window(self, key: str) -> _Window:
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= self._window_secs:
            if len(self._windows) > 10_000:
                # Forget old windows so that many distinct names cannot grow memory.
                self._windows = {k: w for k, w in self._windows.items() if now - w.start < self._window_secs}
            start = now if window is None else window.start + self._window_secs * math.floor(
                (now - window.start) / self._window_secs
            )
            window = _Window(start)
            self._windows[key] = window
        return window

    def _decision(self, window: _Window, allowed: bool, reason: str = "") -> RateDecision:
        left_secs = max(0.0, window.start + self._window_secs - self._clock())
        reset = math.ceil(left_secs)
        return RateDecision(
            allowed=allowed,
            limit=self._limit,
            remaining=max(0, self._limit - window.requests),
            reset_secs=reset,
            retry_after_secs=max(1, reset),
            reason=reason,
        )

    def peek(self, key: str) -> RateDecision:
        """The current state, without counting anything."""
        return self._decision(self._window(key), True)

    def acquire_request(self, key: str) -> RateDecision:
        """Counts one request unless the request limit of the window is reached."""
        window = self._window(key)
        if self._rps is not None and window.requests >= self._limit:
            return self._decision(window, False, f"request rate limit of {self._limit} per window reached")
        window.requests += 1
        return self._decision(window, True)

    def acquire_bytes(self, key: str, nbytes: int) -> RateDecision:
        """Counts wire bytes unless they would exceed the byte limit of the window.

        A first request of a window is always let through, so that a body larger
        than the per-window budget is not refused forever.
        """
        window = self._window(key)
        if self._bps is not None and window.bytes > 0 and window.bytes + nbytes > self._bps:
            return self._decision(window, False, f"byte rate limit of {self._bps} bytes per window reached")
        window.bytes += nbytes
        return self._decision(window, True)
