"""Ready-to-run Beam pipelines that deliver data to Tinybird with :class:`sinks.tinybird.WriteToTinybird`.

* ``python -m pipelines.files_to_tinybird``: NDJSON, JSON, CSV, Avro or Parquet files (batch).
* ``python -m pipelines.streaming_to_tinybird``: Pub/Sub messages, in fixed windows (streaming).
* ``python -m pipelines.replay_dead_letters``: resends what a previous run dead-lettered.

Without ``--api_url`` each of them starts the local Events API server
(:mod:`tinybird_emulator`) and prints a summary of what happened when it ends.
"""
