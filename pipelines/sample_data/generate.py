"""Writes ``events.ndjson``: the sample data set that the pipelines use by default.

Seeded, so running it again gives the same file byte for byte::

    python pipelines/sample_data/generate.py            # writes events.ndjson beside this file

5,000 web and e-commerce events with ISO timestamps, nested objects and arrays,
each with one of three ``type`` values (:data:`TYPES`: ``pageviews``, ``searches``, ``commerce``).
Every row has the same fields and types (a ``purchase`` object only on purchases)
so that the data source's schema, which the server infers from whichever batch
arrives first, is the same whatever the batching. A few rows show every outcome:

* :data:`QUARANTINED` rows hold an impossible timestamp (the zero date of a
  broken client clock, or month 13). They look like date-times, so the column
  stays a date-time whichever batch defines it, and the server quarantines them.
* :data:`UNSENDABLE` lines are not a JSON object (a line cut short by a crash,
  and a legacy client's JSON array); the sink dead-letters them without sending.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
from pathlib import Path
from typing import Any

ROWS = 5_000
"""Lines in the file, including the quarantined and unsendable ones."""
SEED = 20240501
QUARANTINED = 10
"""Rows the local server puts in ``<datasource>_quarantine``."""
UNSENDABLE = 2
"""Lines the sink dead-letters as ``unencodable``."""

_START = datetime.datetime(2024, 5, 1, 8, 0, 0, tzinfo=datetime.UTC)
_COUNTRIES = ["ES", "FR", "DE", "GB", "US", "MX", "IT", "PT", "NL", "BR"]
_CURRENCY = {"ES": "EUR", "FR": "EUR", "DE": "EUR", "IT": "EUR", "PT": "EUR", "NL": "EUR",
             "GB": "GBP", "US": "USD", "MX": "MXN", "BR": "BRL"}
_DEVICES = ["desktop", "mobile", "mobile", "tablet"]
_BROWSERS = ["chrome", "safari", "firefox", "edge"]
_REFERRERS = ["https://www.google.com/", "https://duckduckgo.com/", "https://t.co/", "",
              "https://news.ycombinator.com/", "https://www.instagram.com/"]
_CATEGORIES = ["shoes", "shirts", "bags", "watches", "hats", "socks"]
_TAGS = ["returning", "newsletter", "mobile-app", "campaign-spring", "first-visit", "vip"]
_QUERIES = ["running shoes", "red bag", "linen shirt", "watch strap", "wool socks", "sun hat"]
# Event types and their weights: most traffic is page views.
_EVENT_TYPES = ["page_view", "search", "product_view", "add_to_cart", "purchase"]
_EVENT_WEIGHTS = [50, 10, 22, 9, 9]
TYPES = {"page_view": "pageviews", "product_view": "pageviews", "search": "searches",
         "add_to_cart": "commerce", "purchase": "commerce"}
"""The ``type`` of each ``event_type``: three values, each a data source name, for
``--datasource_field type`` (``./dev demo --datasource_field type``)."""


def _iso_millis(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _event(rng: random.Random, index: int, moment: datetime.datetime,
           event_type: str | None = None) -> dict[str, Any]:
    event_type = event_type or rng.choices(_EVENT_TYPES, weights=_EVENT_WEIGHTS)[0]
    country = rng.choice(_COUNTRIES)
    user_number = rng.randrange(1, 800)
    category = rng.choice(_CATEGORIES)
    products = [f"sku-{category}-{rng.randrange(100, 999)}" for _ in range(rng.randrange(1, 4))]
    if event_type == "page_view":
        path = rng.choice(["/", "/sale", f"/c/{category}", "/about", "/blog/summer-looks"])
    elif event_type == "search":
        path = "/search"
    else:
        path = f"/p/{products[0]}"
    event: dict[str, Any] = {
        "event_id": f"evt_{index:06d}_{rng.getrandbits(32):08x}",
        "timestamp": _iso_millis(moment),
        "event_type": event_type,
        "type": TYPES[event_type],
        "session_id": f"s_{user_number:04d}_{rng.getrandbits(24):06x}",
        "user": {
            "id": f"u_{user_number:04d}",
            "country": country,
            "device": rng.choice(_DEVICES),
            "browser": rng.choice(_BROWSERS),
            "logged_in": rng.random() < 0.4,
        },
        "page": {
            "path": path,
            "referrer": rng.choice(_REFERRERS),
            "load_ms": rng.randrange(80, 2500),
        },
        "product_ids": products if event_type != "page_view" else [],
        "tags": sorted(rng.sample(_TAGS, rng.randrange(0, 3))),
        "search_query": rng.choice(_QUERIES) if event_type == "search" else "",
    }
    if event_type == "purchase":
        items = rng.randrange(1, 5)
        # Always with cents, so every amount is a JSON float and the column a Float64.
        amount = round(items * rng.uniform(9.0, 120.0), 2)
        if amount == round(amount):
            amount += 0.01
        event["purchase"] = {
            "order_id": f"ord_{index:06d}",
            "amount": amount,
            "currency": _CURRENCY[country],
            "items": items,
            "coupon_used": rng.random() < 0.2,
        }
    return event


def generate(*, rows: int = ROWS, seed: int = SEED) -> list[str]:
    """The file's lines (without newlines), deterministic for a given seed."""
    rng = random.Random(seed)
    moment = _START
    lines: list[str] = []
    # Impossible timestamps and unsendable lines sit in the second half, so the
    # first rows that a reader sees are clean, complete and show every field.
    bad_time_at = set(rng.sample(range(rows // 2, rows), QUARANTINED + UNSENDABLE))
    unsendable_at = set(sorted(bad_time_at)[::6][:UNSENDABLE])
    quarantined_at = bad_time_at - unsendable_at
    for index in range(rows):
        moment += datetime.timedelta(milliseconds=rng.randrange(50, 4000))
        event = _event(rng, index, moment, event_type="purchase" if index == 0 else None)
        if index in quarantined_at:
            if len(quarantined_at) % 2:
                event["timestamp"] = "0000-00-00 00:00:00"
            else:
                event["timestamp"] = _iso_millis(moment).replace("2024-05-", "2024-13-")
            quarantined_at.discard(index)
        line = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        if index in unsendable_at:
            if len(unsendable_at) == UNSENDABLE:
                line = line[: len(line) // 2]  # the writer crashed in the middle of the line
            else:
                line = json.dumps([event["event_type"], event["timestamp"], event["user"]["id"]])
            unsendable_at.discard(index)
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("events.ndjson"))
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    lines = generate(rows=args.rows, seed=args.seed)
    args.output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} lines to {args.output}")


if __name__ == "__main__":
    main()
