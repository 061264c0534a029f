"""Fault injection: rules that make chosen /v0/events requests fail, stall or reset.

A rule is a frozen value parsed from JSON; a :class:`FaultInjector` holds the
active rules with their counters and random generators and decides, for each
valid request, which rule (if any) fires. Rules are evaluated in order; every
rule whose filter matches counts the request, and the first one that decides to
fire is applied.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["FaultInjector", "FaultRule", "FiredFault", "parse_rules"]

WHEN_BEFORE = "before"
WHEN_AFTER = "after"

_KNOWN_KEYS = frozenset(
    {
        "status",
        "reset",
        "when",
        "latency_secs",
        "datasource",
        "probability",
        "seed",
        "sequence",
        "times",
        "retry_after_secs",
        "message",
    }
)


def _is_int(value: Any) -> bool:
    """An integer, not a boolean (Python's bool is an int: JSON true would read as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite number, not a boolean."""
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _shown(value: Any) -> str:
    """``value`` as JSON wrote it, for the message refusing it."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean, not a number)"
    return repr(value)


@dataclasses.dataclass(frozen=True)
class FaultRule:
    """One fault rule (the JSON object accepted by ``--faults`` and ``PUT /_emulator/faults``).

    Attributes:
        status: HTTP status to answer (400..599), or ``None`` for a latency-only rule.
        reset: Close the connection without any response instead of answering.
        when: ``"before"``: nothing is stored. ``"after"``: the rows are stored and
            committed, then the client gets the failure.
        latency_secs: Extra delay before answering (before storing for ``before``,
            after the commit for ``after``).
        datasource: Only requests to this data source match; ``None`` matches all.
        probability: Chance to fire on a matching request (ignored with ``sequence``).
        seed: Seed of this rule's random generator, for reproducible runs.
        sequence: 1-based ordinals of the matching requests on which to fire,
            e.g. ``(1, 2, 5)``; replaces ``probability``.
        times: Fire at most this many times; ``None`` for no cap.
        retry_after_secs: Value of a ``Retry-After`` header on the failure.
        message: Text of the ``{"error": ...}`` body.
    """

    status: int | None = None
    reset: bool = False
    when: str = WHEN_BEFORE
    latency_secs: float = 0.0
    datasource: str | None = None
    probability: float = 1.0
    seed: int | None = None
    sequence: tuple[int, ...] | None = None
    times: int | None = None
    retry_after_secs: float | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        if self.status is not None and (not _is_int(self.status) or not 400 <= self.status <= 599):
            raise ValueError(f"status must be an integer in 400..599 or null, got {_shown(self.status)}")
        if not isinstance(self.reset, bool):
            raise ValueError(f"reset must be a boolean, got {self.reset!r}")
        if self.reset and self.status is not None:
            raise ValueError("a rule sets either status or reset, not both")
        if self.when not in (WHEN_BEFORE, WHEN_AFTER):
            raise ValueError(f"when must be 'before' or 'after', got {self.when!r}")
        if not _is_number(self.latency_secs) or not 0 <= self.latency_secs <= 3600:
            raise ValueError(f"latency_secs must be a number in 0..3600, got {_shown(self.latency_secs)}")
        if self.status is None and not self.reset and self.latency_secs == 0:
            raise ValueError("a rule needs a status, reset=true or a latency_secs > 0")
        if self.datasource is not None and not isinstance(self.datasource, str):
            raise ValueError(f"datasource must be a string or null, got {self.datasource!r}")
        if not _is_number(self.probability) or not 0 <= self.probability <= 1:
            raise ValueError(f"probability must be a number in 0..1, got {_shown(self.probability)}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or null, got {_shown(self.seed)}")
        if self.sequence is not None:
            seq = tuple(self.sequence)
            bad = [n for n in seq if not _is_int(n) or n < 1]
            if not seq or bad:
                raise ValueError("sequence must be a non-empty list of integers >= 1, got "
                                 + (_shown(bad[0]) if bad else "[]"))
            object.__setattr__(self, "sequence", seq)
        if self.times is not None and (not _is_int(self.times) or self.times < 0):
            raise ValueError(f"times must be an integer >= 0 or null, got {_shown(self.times)}")
        if self.retry_after_secs is not None and (not _is_number(self.retry_after_secs) or self.retry_after_secs < 0):
            raise ValueError(f"retry_after_secs must be a number >= 0 or null, got {_shown(self.retry_after_secs)}")
        if self.message is not None and not isinstance(self.message, str):
            raise ValueError(f"message must be a string or null, got {self.message!r}")

    @classmethod
    def from_json(cls, obj: Any) -> FaultRule:
        """Builds a rule from a decoded JSON object; unknown keys are a ValueError."""
        if not isinstance(obj, Mapping):
            raise ValueError(f"a fault rule must be a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - _KNOWN_KEYS
        if unknown:
            raise ValueError(f"unknown fault rule keys: {sorted(unknown)}")
        kwargs: dict[str, Any] = dict(obj)
        if kwargs.get("sequence") is not None:
            if not isinstance(kwargs["sequence"], (list, tuple)):
                raise ValueError(f"sequence must be a list, got {kwargs['sequence']!r}")
            kwargs["sequence"] = tuple(kwargs["sequence"])
        if kwargs.get("latency_secs") is None:
            kwargs.pop("latency_secs", None)
        if kwargs.get("probability") is None:
            kwargs.pop("probability", None)
        if kwargs.get("when") is None:
            kwargs.pop("when", None)
        if kwargs.get("reset") is None:
            kwargs.pop("reset", None)
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.sequence is not None:
            out["sequence"] = list(self.sequence)
        return out


def parse_rules(obj: Any) -> tuple[FaultRule, ...]:
    """Parses a JSON list of rules (or ``{"rules": [...]}``) into rules."""
    if isinstance(obj, Mapping) and "rules" in obj:
        obj = obj["rules"]
    if not isinstance(obj, list):
        raise ValueError("faults must be a JSON list of rules or an object with a 'rules' list")
    rules = []
    for index, item in enumerate(obj):
        try:
            rules.append(FaultRule.from_json(item))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"fault rule {index}: {exc}") from None
    return tuple(rules)


@dataclasses.dataclass(frozen=True)
class FiredFault:
    """The decision for one request: which rule fired and what it asks for."""

    index: int
    rule: FaultRule
    generation: int


class _RuleState:
    def __init__(self, rule: FaultRule) -> None:
        self.rule = rule
        self.rng = random.Random(rule.seed)
        self.matched = 0
        self.fired = 0
        self.rows_stored_after = 0


class FaultInjector:
    """Active rules and their counters; thread-safe (the writer thread reports rows)."""

    def __init__(self, rules: Sequence[FaultRule] = ()) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._states: list[_RuleState] = [_RuleState(r) for r in rules]

    def set_rules(self, rules: Sequence[FaultRule]) -> None:
        """Replaces every rule; counters start again from zero."""
        with self._lock:
            self._generation += 1
            self._states = [_RuleState(r) for r in rules]

    def decide(self, datasource: str) -> FiredFault | None:
        """Counts the request against every matching rule; returns the first that fires."""
        chosen: FiredFault | None = None
        with self._lock:
            for index, state in enumerate(self._states):
                rule = state.rule
                if rule.datasource is not None and rule.datasource != datasource:
                    continue
                state.matched += 1
                if rule.sequence is not None:
                    fire = state.matched in rule.sequence
                else:
                    # Draw even when probability is 1 so that a seeded run does not
                    # depend on which other rules are present.
                    fire = state.rng.random() < rule.probability
                if not fire or chosen is not None:
                    continue
                if rule.times is not None and state.fired >= rule.times:
                    continue
                state.fired += 1
                chosen = FiredFault(index=index, rule=rule, generation=self._generation)
        return chosen

    def record_rows_stored_after(self, fired: FiredFault, rows: int) -> None:
        """Counts rows that an ``after`` rule let be stored while the client saw a failure."""
        with self._lock:
            if fired.generation == self._generation and fired.index < len(self._states):
                self._states[fired.index].rows_stored_after += rows

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "index": index,
                    "rule": state.rule.to_json(),
                    "matched": state.matched,
                    "fired": state.fired,
                    "rows_stored_after": state.rows_stored_after,
                }
                for index, state in enumerate(self._states)
            ]

    def rules(self) -> list[dict[str, Any]]:
        with self._lock:
            return [state.rule.to_json() for state in self._states]
