"""The streaming demo: the sample data through Pub/Sub (the emulator) into the local Events API server.

    ./dev stream-demo [--publish_secs 10] [--run_secs 25]
    python -m pipelines.streaming_demo

Starts Google's Pub/Sub emulator on 127.0.0.1 (the ``google-cloud-cli-pubsub-emulator``
package and Java; a clear message when they are missing), creates a topic and
a subscription, and publishes ``pipelines/sample_data/events.ndjson`` (5,000
events, 2 lines of them not JSON) over ``--publish_secs`` seconds as JSON and
NDJSON messages, with 3 bad messages among them. Meanwhile the streaming job
(``pipelines.streaming_to_tinybird``) reads the subscription on Beam's
DirectRunner, sends to the local Events API server it starts (data in
``./tinybird-local/``), writes dead letters to ``./dead-letters/``, logs its
progress, stops after ``--run_secs`` seconds once the rows in flight are
delivered or dead-lettered, and prints its summary.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pipelines._pubsub_emulator import EmulatorUnavailable, PubSubEmulator, gcloud_command
from pipelines._running import configure_logging

_LOG = logging.getLogger("pipelines.streaming_demo")

SAMPLE = Path(__file__).resolve().parent / "sample_data" / "events.ndjson"
BAD_MESSAGES = (b"not JSON at all", b'["a JSON array, not an object"]', b"\xff\xfe not UTF-8")
TOPIC, SUBSCRIPTION = "events", "events-demo"


def sample_messages(lines: Sequence[bytes]) -> list[bytes]:
    """The sample lines as messages: NDJSON of 1 to 20 lines (10 on average), a bad message every 150."""
    messages: list[bytes] = []
    i = n = 0
    while i < len(lines):
        size = 1 + (n * 7) % 20
        messages.append(b"\n".join(lines[i:i + size]) + b"\n")
        i += size
        n += 1
        if n % 150 == 0 and n // 150 <= len(BAD_MESSAGES):
            messages.append(BAD_MESSAGES[n // 150 - 1])
    return messages


def _publish(emulator: PubSubEmulator, topic: str, messages: Sequence[bytes], *, over_secs: float,
             start_after_secs: float) -> None:
    time.sleep(start_after_secs)
    interval = over_secs / max(len(messages), 1)
    started = time.monotonic()
    with emulator.publisher() as client:
        for k, message in enumerate(messages):
            time.sleep(max(0.0, started + k * interval - time.monotonic()))
            client.publish(topic, message)
    _LOG.info("Published %s messages in %.1f s. The rows read last wait until Beam's DirectRunner ends its "
              "next Pub/Sub pull (up to 30 s on a quiet subscription) before the sink's timers send them",
              f"{len(messages):,}", time.monotonic() - started)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="./dev stream-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--publish_secs", type=float, default=10.0, help="spread the messages over this long")
    parser.add_argument("--run_secs", type=float, default=25.0, help="stop the job after this long")
    args, job_args = parser.parse_known_args(argv)
    configure_logging()
    try:
        gcloud_command()
    except EmulatorUnavailable as error:
        print(f"./dev stream-demo: {error}", file=sys.stderr)
        raise SystemExit(2) from None

    from pipelines import streaming_to_tinybird

    lines = [line for line in SAMPLE.read_bytes().split(b"\n") if line.strip()]
    messages = sample_messages(lines)
    with tempfile.TemporaryDirectory(prefix="pubsub-emulator-") as scratch, \
            PubSubEmulator(data_dir=Path(scratch)) as emulator:
        topic = emulator.create_topic(TOPIC)
        subscription = emulator.create_subscription(SUBSCRIPTION, topic=topic)
        print(f"Pub/Sub emulator at {emulator.host}: {topic}, {subscription}")
        print(f"Publishing {len(lines):,} sample events in {len(messages):,} messages "
              f"({len(BAD_MESSAGES)} of them not JSON) over {args.publish_secs:g} s; "
              f"the job stops after {args.run_secs:g} s\n", flush=True)
        # Beam's ReadFromPubSub, in this process, finds the emulator here.
        os.environ.update(emulator.environ({}))
        publisher = threading.Thread(
            target=_publish, args=(emulator, topic, messages),
            kwargs={"over_secs": args.publish_secs, "start_after_secs": 3.0}, daemon=True)
        publisher.start()
        streaming_to_tinybird.main([
            "--input_subscription", subscription, "--dead_letter_path", "dead-letters/",
            "--stop_after_secs", f"{args.run_secs:g}", *job_args])


if __name__ == "__main__":
    main()
