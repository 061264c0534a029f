"""The sample data set of the pipelines: ``events.ndjson``, written by ``generate.py``."""
