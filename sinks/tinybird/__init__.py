"""A Beam sink for the Tinybird Events API.

    from sinks.tinybird import WriteToTinybird

    result = events | "ToTinybird" >> WriteToTinybird(datasource="events", token=...)
    result.dead_letters   # what was not delivered, one DeadLetter per element

See :class:`WriteToTinybird` for batching, retries, dead letters and every option.
"""

from sinks.tinybird._routing import DatasourceFromField
from sinks.tinybird._transform import WriteToTinybird, WriteToTinybirdResult
from sinks.tinybird._yaml import WriteToTinybirdByField
from sinks.tinybird.dead_letters import (
    DeadLetter,
    DeadLetterKind,
    DeliveryError,
    ReadDeadLetters,
    WriteDeadLetterFiles,
)
from sinks.tinybird.retry import RetryPolicy

__all__ = [
    "DatasourceFromField",
    "DeadLetter",
    "DeadLetterKind",
    "DeliveryError",
    "ReadDeadLetters",
    "RetryPolicy",
    "WriteDeadLetterFiles",
    "WriteToTinybird",
    "WriteToTinybirdByField",
    "WriteToTinybirdResult",
]
