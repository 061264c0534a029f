"""Keeps the token out of every text the HTTP layer hands on, and out of the logs.

:class:`Redactor` scrubs a text first, in any case of the token's letters, and
caps it second (capping first could cut the token in two and let a part
through). :func:`install_log_redaction` puts one process-wide
:class:`logging.Filter` on the loggers of the HTTP stack (urllib3, requests)
and of the sink's HTTP layer, so that a server echoing the token in a malformed
header line does not put it in urllib3's warning either; it holds every token
of every open client and is safe to install repeatedly.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
import traceback
import urllib.parse
from collections.abc import Iterable

__all__ = ["REDACTED", "Redactor", "cap", "install_log_redaction", "uninstall_log_redaction"]

REDACTED = "***"

# Loggers whose records are filtered while a client is open. A logger's filters
# only see the records logged to that very logger (not those propagated from
# its children), hence every module of the HTTP stack that logs is named.
_HTTP_LOGGERS = (
    "urllib3",
    "urllib3.connection",
    "urllib3.connectionpool",
    "urllib3.poolmanager",
    "urllib3.response",
    "urllib3.util.retry",
    "requests",
    "sinks.tinybird._events_api",
    "sinks.tinybird._http.transport",
    "sinks.tinybird._transform",
)


def cap(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, ``...`` marking a cut."""
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def _spellings(token: str) -> tuple[str, ...]:
    """The token as it can appear in a text: as is, escaped in JSON, in a repr
    (urllib3 logs the unparsed bytes of a header as a repr), percent-encoded."""
    forms = {token, json.dumps(token)[1:-1], repr(token)[1:-1], repr(token.encode())[2:-1],
             urllib.parse.quote(token, safe="")}
    # Longest first, so that a spelling holding another is replaced whole.
    return tuple(sorted(forms, key=len, reverse=True))


class Redactor:
    """Scrubs one or more tokens out of texts, whatever the case of their letters;
    never shows them in its repr."""

    def __init__(self, tokens: Iterable[str]) -> None:
        spellings: set[str] = set()
        for token in tokens:
            if token:
                spellings.update(_spellings(token))
        self._spellings = tuple(sorted(spellings, key=len, reverse=True))
        # Any case: a token echoed with its letters' case changed (by a server, a proxy,
        # or code that lower-cases a value) still tells most of it. Alternatives are
        # tried longest first, so that a spelling holding another is replaced whole.
        self._pattern = (re.compile("|".join(map(re.escape, self._spellings)), re.IGNORECASE)
                         if self._spellings else None)

    def __repr__(self) -> str:
        return f"Redactor({len(self._spellings)} spellings)"

    def scrub(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub(REDACTED, text)

    def bounded(self, text: str, limit: int) -> str:
        """Scrubbed first, then capped to ``limit`` characters."""
        return cap(self.scrub(text), limit)


class _RedactingFilter(logging.Filter):
    """Rewrites a record's message (and its exception text) without the tokens."""

    def __init__(self) -> None:
        super().__init__("tinybird-redaction")
        self._lock = threading.Lock()
        self._tokens: collections.Counter[str] = collections.Counter()
        self._redactor = Redactor(())

    def __repr__(self) -> str:
        return "<tinybird token redaction>"

    def add(self, token: str) -> None:
        with self._lock:
            self._tokens[token] += 1
            self._redactor = Redactor(self._tokens)

    def remove(self, token: str) -> bool:
        """Forgets one registration of ``token``; True when no token is left."""
        with self._lock:
            if self._tokens[token] > 0:
                self._tokens[token] -= 1
            self._tokens += collections.Counter()  # drops the zero counts
            self._redactor = Redactor(self._tokens)
            return not self._tokens

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = self._redactor
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not format: keep its template only
            message = str(record.msg)
        record.msg, record.args = redactor.scrub(message), ()
        if record.exc_info:
            # Formatted and scrubbed now; handlers print exc_text when it is set.
            text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_info, record.exc_text = None, redactor.scrub(text.rstrip("\n"))
        elif record.exc_text:
            record.exc_text = redactor.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = redactor.scrub(record.stack_info)
        return True


_FILTER = _RedactingFilter()
_INSTALL_LOCK = threading.Lock()


def install_log_redaction(token: str) -> None:
    """Scrubs ``token`` from the records of the HTTP loggers until uninstalled."""
    with _INSTALL_LOCK:
        _FILTER.add(token)
        for name in _HTTP_LOGGERS:
            logger = logging.getLogger(name)
            if _FILTER not in logger.filters:
                logger.addFilter(_FILTER)


def uninstall_log_redaction(token: str) -> None:
    """Undoes one :func:`install_log_redaction`; the filter leaves with the last token."""
    with _INSTALL_LOCK:
        if _FILTER.remove(token):
            for name in _HTTP_LOGGERS:
                logging.getLogger(name).removeFilter(_FILTER)
