"""Soak test (not run in CI): the sink against the local server with random faults, for minutes.

    python scripts/soak.py --minutes 10 [--seed S] [--events-per-round N]

Rounds follow each other until the time is up. Each round sends its own range of
unique ids through WriteToTinybird under one scenario drawn at random (random
503/429, 500 and resets before and after storing, answers slower than the read
timeout, a 429 burst beyond the retry budget, 400/403 for some requests, the
server restarted or killed mid-run, a worker failure after posting so that the
runner retries the bundle, and a mix whose rules change while the run goes on),
with random sink settings (runner, compression, batch size, shards, requests in
flight, wait). The server also keeps its default rate limit (100 requests/s per
data source), so real 429s come on top.

After each round: whatever was dead-lettered is replayed with
``pipelines.replay_dead_letters`` (faults off), then every id of the round is
looked for in the data source. The accounting is printed per round and in total:
events sent, acknowledged, dead-lettered, stored, missing (must be 0) and
duplicates, each with its explanation: rows the server says it stored behind a
failure it answered (exact), requests stored but answered after the read timeout
(counted by the server's fault rules; at most one batch each), requests cut by a
server restart or crash, and batches re-posted by a retried bundle: each
duplicate by evidence tied to it, from the requests this process made (an id
posted by the failed bundle's client and re-posted, in the same batch, by another
client after the injected worker failure; an id that was
in an attempt that got no answer), never by the round's scenario; when the posts
were made in another process (multi_processing), the bound of one batch per
unanswered attempt. Also dead letters replayed although an earlier attempt had
stored them (exact). Exit status 1 if an id is
missing or a duplicate is not explained.

Everything runs on 127.0.0.1; the runners are named explicitly (FnApiRunner,
BundleBasedDirectRunner) so that the DirectRunner never tries to download Prism.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import io
import logging
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import weakref
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
# Workers started by the multi-processing runner must find the project's packages.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)

import apache_beam as beam
import orjson
import requests
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from pipelines import replay_dead_letters
from sinks.tinybird import DeadLetter, RetryPolicy, WriteToTinybird
from tinybird_emulator import LocalServer

DATASOURCE = "soak"
LINE_BYTES = 64  # every event line is this long, so a full batch holds a known number of rows
ROUND_ID_SPAN = 10_000_000

SCENARIOS = (
    "random_503_429", "500_and_resets", "slow_answers", "burst_429", "rejected_400_403",
    "restart", "crash", "worker_failure", "changing_mix",
)


def events(n: int, start: int) -> list[dict]:
    out = []
    for i in range(start, start + n):
        out.append({"id": i, "kind": "soak", "pad": "x" * (LINE_BYTES - 30 - len(str(i)))})
    return out


@dataclasses.dataclass
class Round:
    """What one round did, and where each of its ids ended up."""

    number: int
    scenario: str
    settings: str
    sent: int = 0
    acknowledged: int | None = None
    dead_lettered: Counter[str] = dataclasses.field(default_factory=collections.Counter)
    replayed: int = 0
    stored_unique: int = 0
    missing: int = 0
    duplicates: int = 0
    # Explanations of the duplicates.
    after_fault_rows: int = 0  # exact: the server's rows.stored_by_after_faults
    dead_but_stored: int = 0  # exact: replayed dead letters an earlier attempt had stored
    bundle_retry_rows: int = 0  # exact: ids re-posted, in the same batch, after the injected worker failure
    no_answer: int = 0  # attempts without a response (timeouts, resets, restarts): at most one batch each
    # When this process saw the round's posts: duplicates of ids that were in an unanswered attempt
    # (evidence per id); else None and the bound no_answer * rows_per_batch stands.
    no_answer_rows: int | None = None
    late_stores: int = 0  # of those, requests the server stored and answered after the read timeout
    rows_per_batch: int = 0
    seconds: float = 0.0

    @property
    def exact_explained(self) -> int:
        return self.after_fault_rows + self.dead_but_stored + self.bundle_retry_rows

    @property
    def explained_bound(self) -> int:
        if self.no_answer_rows is not None:
            return self.exact_explained + self.no_answer_rows
        return self.exact_explained + self.no_answer * self.rows_per_batch

    @property
    def unexplained(self) -> int:
        return max(0, self.duplicates - self.explained_bound)

    def line(self) -> str:
        dead = ", ".join(f"{k} {v}" for k, v in sorted(self.dead_lettered.items())) or "0"
        why = []
        if self.after_fault_rows:
            why.append(f"{self.after_fault_rows} stored behind a failure")
        if self.dead_but_stored:
            why.append(f"{self.dead_but_stored} replayed though stored")
        if self.bundle_retry_rows:
            why.append(f"{self.bundle_retry_rows} re-posted by a retried bundle")
        if self.late_stores:
            why.append(f"{self.late_stores} stored but answered late")
        if self.duplicates > self.exact_explained and self.no_answer_rows is not None:
            why.append(f"{min(self.duplicates - self.exact_explained, self.no_answer_rows)} of ids in "
                       f"{self.no_answer} unanswered attempts")
        elif self.duplicates > self.exact_explained:
            why.append(f"{self.duplicates - self.exact_explained} within {self.no_answer} unanswered attempts "
                       f"x {self.rows_per_batch} rows (a bound: the posts were made in another process)")
        ack = "n/a" if self.acknowledged is None else str(self.acknowledged)
        return (
            f"[{self.number:3d}] {self.scenario:<16} {self.settings:<44} sent {self.sent:6d}  ack {ack:>6}  "
            f"dead {dead}  replayed {self.replayed}  stored {self.stored_unique}  missing {self.missing}  "
            f"dups {self.duplicates}" + (f" ({'; '.join(why)})" if why else "") + f"  {self.seconds:.1f}s")


class PostLog:
    """Records the sink's HTTP posts in this process; can make the worker fail once after one."""

    def __init__(self) -> None:
        # (status or None, ids, step it started at, session number). Steps count each post's start
        # and the injected failure; the number of the requests.Session that posted tells a DoFn
        # instance (the runner retries a failed bundle on a new one, with a new client).
        self.posts: list[tuple] = []
        self.fail_after: int | None = None
        self.failed_at: int | None = None  # the step at which the injected failure discarded an answer
        self.failed_session: int | None = None
        self._steps = 0
        self._sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._session_count = 0
        self._lock = threading.Lock()
        self._real = requests.Session.post

    @contextlib.contextmanager
    def installed(self):
        log = self

        def post(session, url, data=None, **kwargs):
            ids = _ids_of(data, (kwargs.get("headers") or {}).get("Content-Encoding"))
            started, number = log._start(session)
            try:
                response = log._real(session, url, data=data, **kwargs)
            except requests.RequestException:
                with log._lock:
                    log.posts.append((None, ids, started, number))
                raise
            with log._lock:
                log.posts.append((response.status_code, ids, started, number))
                fail = log.fail_after is not None and len(log.posts) == log.fail_after
                if fail:
                    log.fail_after = None
                    log._steps += 1
                    log.failed_at, log.failed_session = log._steps, number
            if fail:
                raise RuntimeError("soak: injected worker failure after the server answered")
            return response

        requests.Session.post = post
        try:
            yield self
        finally:
            requests.Session.post = self._real


    def _start(self, session: requests.Session) -> tuple[int, int]:
        """The step a post starts at, and its session's number."""
        with self._lock:
            self._steps += 1
            number = self._sessions.get(session)
            if number is None:
                self._session_count += 1
                number = self._sessions[session] = self._session_count
            return self._steps, number


def _ids_of(body: bytes, encoding: str | None) -> list[int]:
    import zlib

    import zstandard

    if encoding == "zstd":
        body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    elif encoding == "gzip":
        body = zlib.decompress(body, wbits=31)
    return [orjson.loads(line)["id"] for line in body.split(b"\n") if line.strip()]


def explain_by_posts(posts: list[tuple], failure: tuple[int, int] | None,
                     stored: Counter[int]) -> tuple[int, int]:
    """Duplicates explained by evidence tied to each one, from the posts this process saw.

    ``posts`` are ``(status or None, ids, step it started at, session number)``;
    ``failure`` is ``(step, session number)`` of the injected failure, which discarded an
    answer. Returns ``(by the retried bundle, by an attempt that got no answer)``. A
    duplicate of an id is put down to the retried bundle only when a 2xx post by the
    failed bundle's client (the session the failure hit: the DoFn instance that ran the
    bundle, before the failure or still in flight after it) is posted again, by another
    client, started after the failure, with exactly the same ids in the same order (the
    runner retries a failed bundle on a new DoFn instance, which re-posts its batches).
    A double post by one client is never explained that way. What is left of an id's
    duplicates is put down to unanswered attempts only when the id was in one (one
    duplicate per such attempt). ``stored`` counts each id in the data source.
    """
    reposted: Counter[int] = collections.Counter()
    if failure is not None:
        failed_at, failed_session = failure
        before = collections.Counter(tuple(ids) for status, ids, _, session in posts
                                     if status is not None and status < 300 and session == failed_session)
        after = collections.Counter(tuple(ids) for status, ids, started, session in posts
                                    if status is not None and status < 300 and started > failed_at
                                    and session != failed_session)
        for ids, times in (before & after).items():
            reposted.update({i: times for i in ids})
    unanswered = collections.Counter(i for status, ids, _, _ in posts if status is None for i in ids)
    by_bundle = by_no_answer = 0
    for ident, count in stored.items():
        extra = count - 1
        if extra <= 0:
            continue
        from_bundle = min(extra, reposted[ident])
        by_bundle += from_bundle
        by_no_answer += min(extra - from_bundle, unanswered[ident])
    return by_bundle, by_no_answer


def _counters(result) -> dict[str, int]:
    totals: Counter[str] = collections.Counter()
    for counter in result.metrics().query(MetricsFilter().with_namespace("tinybird"))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] += int(value or 0)
    return dict(totals)


def _dead_letters(folder: str) -> list[DeadLetter]:
    records = []
    for name in sorted(glob.glob(os.path.join(folder, "*"))):
        with open(name, "rb") as fh:
            records.extend(DeadLetter(**orjson.loads(line)) for line in fh if line.strip())
    return records


def _stored(server: LocalServer, start: int, n: int) -> Counter[int]:
    server.flush()
    if DATASOURCE not in server.datasources():
        return collections.Counter()
    rows = server.query(
        f"SELECT id, count(*) AS n FROM {DATASOURCE} WHERE id >= {start} AND id < {start + n} GROUP BY id")
    return collections.Counter({row["id"]: row["n"] for row in rows})


def _latency_only_fired(server: LocalServer) -> int:
    return sum(rule["fired"] for rule in server.stats()["faults"]
               if rule["rule"]["status"] is None and not rule["rule"]["reset"])


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    """What one scenario injects, and the sink settings it needs."""

    policy: RetryPolicy
    rules: list[dict] = dataclasses.field(default_factory=list)
    read_timeout_secs: float = 10.0
    changing: bool = False
    disrupt: str | None = None


class Soak:
    def __init__(self, *, seed: int, events_per_round: int, work_dir: str) -> None:
        self.rng = random.Random(seed)
        self.events_per_round = events_per_round
        self.work_dir = work_dir
        self.rounds: list[Round] = []
        self.server = LocalServer(data_dir=os.path.join(work_dir, "server"))
        self.post_log = PostLog()

    # -- one round ---------------------------------------------------------------
    def _fault_plan(self, scenario: str, rng: random.Random, seed: int, policy: RetryPolicy) -> FaultPlan:
        """The server's fault rules and the sink's settings that go with a scenario."""
        if scenario == "random_503_429":
            return FaultPlan(policy=policy, rules=[
                {"status": 503, "when": "before", "probability": rng.uniform(0.05, 0.3), "seed": seed},
                {"status": 429, "when": "before", "probability": rng.uniform(0.05, 0.3), "seed": seed + 1,
                 "retry_after_secs": 1},
            ])
        if scenario == "500_and_resets":
            return FaultPlan(policy=policy, rules=self._failures(seed, rng.uniform(0.02, 0.1)))
        if scenario == "slow_answers":
            return FaultPlan(policy=policy, read_timeout_secs=0.5, rules=[
                {"latency_secs": 1.2, "when": "after", "probability": rng.uniform(0.005, 0.03), "seed": seed},
                {"latency_secs": 1.2, "when": "before", "probability": rng.uniform(0.005, 0.03), "seed": seed + 1},
                {"status": 503, "latency_secs": 1.2, "when": "before", "probability": 0.02, "seed": seed + 2},
            ])
        if scenario == "burst_429":
            first = rng.randint(5, 60)
            return FaultPlan(policy=dataclasses.replace(policy, max_attempts=3), rules=[
                {"status": 429, "when": "before", "sequence": list(range(first, first + rng.randint(20, 80))),
                 "retry_after_secs": 1, "message": "soak: 429 burst"}])
        if scenario == "rejected_400_403":
            return FaultPlan(policy=policy, rules=[
                {"status": 400, "when": "before", "probability": 0.02, "seed": seed, "message": "soak: bad request"},
                {"status": 403, "when": "before", "probability": 0.01, "seed": seed + 1, "message": "soak: forbidden"},
            ])
        if scenario in ("restart", "crash"):
            # Only faults that store nothing: the server's counters start again after a restart.
            return FaultPlan(
                policy=dataclasses.replace(policy, max_attempts=200, max_total_secs=120), disrupt=scenario,
                rules=[{"status": 503, "when": "before", "probability": 0.05, "seed": seed},
                       {"latency_secs": 0.005, "when": "before", "probability": 1.0}])
        if scenario == "changing_mix":
            return FaultPlan(policy=policy, rules=self._mix(rng, seed), changing=True)
        return FaultPlan(policy=policy)  # worker_failure: the post log fails the worker

    def run_round(self, number: int, scenario: str) -> Round:
        rng, server = self.rng, self.server
        n = int(self.events_per_round * rng.uniform(0.6, 1.4))
        start = number * ROUND_ID_SPAN
        max_batch_bytes = rng.choice([2048, 4096, 8192, 16384])
        runner = "bundle_based" if scenario == "worker_failure" else rng.choice(
            ["in_memory", "in_memory", "multi_processing"])
        if scenario in ("crash",):
            wait = True  # a crash loses what was accepted (202) but not committed: the documented trade-off
        else:
            wait = rng.random() < 0.3
        compression = rng.choice(["zstd", "zstd", "gzip", None])
        max_in_flight = rng.randint(1, 4)
        num_shards = rng.randint(1, 4)
        policy = RetryPolicy(max_attempts=8, initial_backoff_secs=0.02, max_backoff_secs=0.5,
                             max_total_secs=60, max_retry_after_secs=0.5)
        seed = rng.randrange(1 << 30)
        plan = self._fault_plan(scenario, rng, seed, policy)
        rules, policy, read_timeout = plan.rules, plan.policy, plan.read_timeout_secs
        changing, disrupt = plan.changing, plan.disrupt
        if scenario == "worker_failure" and rng.random() < 0.5:
            compression = None
        settings = (f"{runner} {compression or 'none'} {max_batch_bytes // 1024}KiB "
                    f"shards={num_shards} inflight={max_in_flight} wait={'T' if wait else 'F'}")
        result = Round(number=number, scenario=scenario, settings=settings, sent=n,
                       rows_per_batch=max_batch_bytes // (LINE_BYTES + 1))
        dead_dir = os.path.join(self.work_dir, f"round-{number:04d}-dead")
        started = time.monotonic()

        server.clear_faults()
        server.flush()
        server.reset_stats()
        server.set_faults(rules)

        write = WriteToTinybird(
            datasource=DATASOURCE, token=server.token, api_url=server.url, wait=wait, compression=compression,
            max_batch_bytes=max_batch_bytes, num_shards=num_shards, max_in_flight=max_in_flight,
            retry_policy=policy, read_timeout_secs=read_timeout, dead_letter_path=dead_dir + "/")
        parts = rng.randint(1, 4)
        size = n // parts
        sizes = [size] * (parts - 1) + [n - size * (parts - 1)]

        def build(p):
            created, offset = [], start
            for k, part_size in enumerate(sizes):
                created.append(p | f"Part{k}" >> beam.Create(events(part_size, offset), reshuffle=False))
                offset += part_size
            (created | beam.Flatten()) | write

        stop = threading.Event()
        helpers = []
        if changing:
            helpers.append(threading.Thread(target=self._change_faults, args=(stop, seed), daemon=True))
        if disrupt:
            helpers.append(threading.Thread(target=self._disrupt, args=(disrupt, start, n, stop, rules), daemon=True))
        posts_before = len(self.post_log.posts)
        if scenario == "worker_failure":
            self.post_log.fail_after = posts_before + rng.randint(2, 10)
        for helper in helpers:
            helper.start()
        try:
            pipeline = _pipeline(runner)
            build(pipeline)
            with _quiet_beam(scenario == "worker_failure"):
                outcome = pipeline.run()
                outcome.wait_until_finish()
        finally:
            stop.set()
            for helper in helpers:
                helper.join(timeout=120)
        counters = _counters(outcome)
        if runner != "bundle_based":  # that runner's metrics lose all but one bundle's counters
            result.acknowledged = counters.get("rows_acknowledged", 0)
        if scenario == "slow_answers":
            time.sleep(1.5)  # requests still sleeping on the server store their rows now
        stats = server.stats()
        if scenario == "slow_answers":
            result.late_stores = _latency_only_fired(server)
        result.after_fault_rows = stats["rows"]["stored_by_after_faults"]
        mine = self.post_log.posts[posts_before:]
        failure = (None if self.post_log.failed_at is None
                   else (self.post_log.failed_at, self.post_log.failed_session))
        self.post_log.failed_at = self.post_log.failed_session = None
        result.no_answer = (sum(1 for status, *_ in mine if status is None) if mine
                            else counters.get("responses_none", 0))
        server.clear_faults()

        letters = _dead_letters(dead_dir)
        result.dead_lettered = collections.Counter(letter.kind for letter in letters)
        first = _stored(server, start, n)
        dead_ids = {orjson.loads(letter.line)["id"] for letter in letters if letter.line is not None}
        result.dead_but_stored = len(dead_ids & set(first))

        if letters:
            result.replayed = self._replay(dead_dir, os.path.join(self.work_dir, f"round-{number:04d}-replayed"))
        stored = _stored(server, start, n)
        result.stored_unique = len(stored)
        result.missing = n - len(set(stored) & set(range(start, start + n)))
        result.duplicates = sum(c - 1 for c in stored.values())
        if mine:
            # The first pass's duplicates (the replay's are dead_but_stored).
            result.bundle_retry_rows, result.no_answer_rows = explain_by_posts(mine, failure, first)
        result.seconds = time.monotonic() - started
        shutil.rmtree(dead_dir, ignore_errors=True)
        return result

    @staticmethod
    def _failures(seed: int, p: float) -> list[dict]:
        return [
            {"status": 500, "when": "before", "probability": p, "seed": seed},
            {"status": 500, "when": "after", "probability": p, "seed": seed + 1},
            {"reset": True, "when": "before", "probability": p / 2, "seed": seed + 2},
            {"reset": True, "when": "after", "probability": p / 2, "seed": seed + 3},
            {"status": 502, "when": "after", "probability": p / 2, "seed": seed + 4},
            {"status": 504, "when": "before", "probability": p / 2, "seed": seed + 5},
        ]

    def _mix(self, rng: random.Random, seed: int) -> list[dict]:
        rules = []
        if rng.random() < 0.7:
            rules.append({"status": 503, "when": "before", "probability": rng.uniform(0.02, 0.2), "seed": seed})
        if rng.random() < 0.7:
            rules.append({"status": 429, "when": "before", "probability": rng.uniform(0.02, 0.2), "seed": seed + 1,
                          "retry_after_secs": 1})
        if rng.random() < 0.7:
            rules += self._failures(seed + 2, rng.uniform(0.01, 0.06))
        if rng.random() < 0.3:
            rules.append({"status": 400, "when": "before", "probability": 0.01, "seed": seed + 9})
        return rules

    def _change_faults(self, stop: threading.Event, seed: int) -> None:
        """Replaces the rules every 0.5-2 s while the run goes on."""
        rng = random.Random(seed)
        while not stop.wait(rng.uniform(0.5, 2.0)):
            with contextlib.suppress(Exception):
                self.server.set_faults(self._mix(rng, rng.randrange(1 << 30)))

    def _disrupt(self, how: str, start: int, n: int, stop: threading.Event, rules: list[dict]) -> None:
        """Restarts (or kills and starts) the server once part of the round is stored."""
        rng = random.Random(start)
        target = int(n * rng.uniform(0.1, 0.7))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not stop.is_set():
            with contextlib.suppress(Exception):
                if _stored_total(self.server, start, n) >= target:
                    break
            time.sleep(0.05)
        if stop.is_set():
            return
        if how == "restart":
            self.server.restart()
        else:
            self.server.kill()
            time.sleep(rng.uniform(0.2, 1.0))
            self.server.start()
        self.server.set_faults(rules)

    def _replay(self, dead_dir: str, out_dir: str) -> int:
        out = io.StringIO()
        summary = replay_dead_letters.run([
            "--input", f"{dead_dir}/*", "--dead_letter_path", f"{out_dir}/", "--api_url", self.server.url,
            "--token", self.server.token, "--datasource", DATASOURCE, "--runner=FnApiRunner",
        ], out=out)
        still = _dead_letters(out_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
        if still:
            raise RuntimeError(f"the replay left {len(still)} dead letters: {still[0]}")
        return summary.rows_acknowledged

    # -- the whole run -------------------------------------------------------------

    def run(self, minutes: float) -> int:
        deadline = time.monotonic() + minutes * 60
        started = time.monotonic()
        order: list[str] = []
        with self.server, self.post_log.installed():
            number = 0
            while time.monotonic() < deadline:
                if not order:
                    order = list(SCENARIOS)
                    self.rng.shuffle(order)
                number += 1
                result = self.run_round(number, order.pop())
                self.rounds.append(result)
                print(result.line(), flush=True)
        return self.summary(time.monotonic() - started)

    def summary(self, elapsed: float) -> int:
        rounds = self.rounds
        by_scenario = collections.Counter(r.scenario for r in rounds)
        dead = collections.Counter()
        for r in rounds:
            dead.update(r.dead_lettered)

        def total(attr: str) -> int:
            return sum(getattr(r, attr) for r in rounds)

        acknowledged = sum(r.acknowledged for r in rounds if r.acknowledged is not None)
        known_ack = sum(r.sent for r in rounds if r.acknowledged is not None)
        missing, duplicates, unexplained = total("missing"), total("duplicates"), total("unexplained")
        lines = [
            "",
            f"Soak: {len(rounds)} rounds in {elapsed / 60:.1f} min "
            f"({', '.join(f'{k} {v}' for k, v in sorted(by_scenario.items()))})",
            f"  events sent                {total('sent')}",
            f"  acknowledged (sink)        {acknowledged} of the {known_ack} sent by runners with reliable metrics",
            f"  dead-lettered (1st pass)   {sum(dead.values())} ({', '.join(f'{k} {v}' for k, v in sorted(dead.items())) or 'none'})",
            f"  replayed and acknowledged  {total('replayed')}",
            f"  stored (unique ids)        {total('stored_unique')}",
            f"  missing                    {missing}",
            f"  duplicates                 {duplicates}",
            f"    stored behind a failure the server answered (server's count)   {total('after_fault_rows')}",
            f"    dead letters replayed though an attempt had stored them         {total('dead_but_stored')}",
            f"    re-posted in the same batch after the injected worker failure   {total('bundle_retry_rows')}",
            f"    attempts without an answer (timeouts, resets, restarts)         {total('no_answer')} "
            f"({sum(r.no_answer_rows or 0 for r in rounds)} duplicates of ids that were in one, "
            f"some also in the server's count; "
            f"{total('late_stores')} known stored and answered late)",
            f"    exactly explained {total('exact_explained')}; bound with unanswered attempts "
            f"{total('explained_bound')}; unexplained {unexplained}",
            f"  rounds whose duplicates equal the exact explanation: "
            f"{sum(1 for r in rounds if r.duplicates == r.exact_explained)} of {len(rounds)}",
        ]
        print("\n".join(lines), flush=True)
        return 1 if missing or unexplained else 0


def _pipeline(runner: str) -> beam.Pipeline:
    if runner == "bundle_based":
        return beam.Pipeline(runner=BundleBasedDirectRunner(), options=PipelineOptions([]))
    args = []
    if runner == "multi_processing":
        args = ["--direct_running_mode=multi_processing", "--direct_num_workers=2",
                "--default_sdk_harness_log_level=WARNING"]
    return beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(args))


def _stored_total(server: LocalServer, start: int, n: int) -> int:
    if DATASOURCE not in server.datasources():
        return 0
    return server.query(
        f"SELECT count(*) AS n FROM {DATASOURCE} WHERE id >= {start} AND id < {start + n}")[0]["n"]


@contextlib.contextmanager
def _quiet_beam(quiet: bool):
    """Hides Beam's ERROR logs of the bundle failure a round injects on purpose."""
    if not quiet:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("apache_beam.runners.direct.executor", "apache_beam.runners.common")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="How long to run (default 10).")
    parser.add_argument("--seed", type=int, default=None, help="Seed of the scenarios and settings (default: random).")
    parser.add_argument("--events-per-round", type=int, default=30_000,
                        help="Average events per round (each round draws 0.6-1.4 times this).")
    parser.add_argument("--work-dir", default=None, help="Where the server's data and dead letters go "
                                                         "(default: a temporary folder, removed at the end).")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"Soak: {args.minutes:g} min, seed {seed}, ~{args.events_per_round} events per round "
          f"(rerun: python scripts/soak.py --minutes {args.minutes:g} --seed {seed})", flush=True)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="tinybird-soak-")
    try:
        return Soak(seed=seed, events_per_round=args.events_per_round, work_dir=work_dir).run(args.minutes)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
