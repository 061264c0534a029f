"""The sink's HTTP layer, in parts that can be read and tested one at a time.

``transport`` makes one attempt and returns a bounded response or a transport
failure; ``classify`` decides, as a pure function, what that answer means for
the rows sent; ``outcomes`` holds the frozen records they exchange; ``redaction``
keeps the token out of every text and log record. The client that loops over
attempts is :class:`sinks.tinybird._events_api.EventsApiClient`.
"""
