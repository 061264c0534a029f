"""Keeps tokens out of the server's log.

aiohttp logs a request it cannot parse at ERROR (``aiohttp.server``) with the raw
request line or header quoted in the exception, so a token in an Authorization
header or a ``?token=`` query (``%74oken=`` too) would be written to the log. :class:`RedactingFilter`
rewrites such records before any handler formats them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import urllib.parse
from collections.abc import Iterator, Sequence

from aiohttp import log as aiohttp_log
from aiohttp.http_exceptions import HttpProcessingError

__all__ = ["REDACTED", "RedactingFilter", "redact", "redacting_aiohttp_logs"]

REDACTED = "[REDACTED]"
REQUEST_BYTES_NOT_LOGGED = "<request bytes not logged>"
# Shorter "secrets" would blank out ordinary words, and are no secret anyway.
_MIN_SECRET_CHARS = 8



def _maybe_percent_encoded(word: str) -> str:
    """A pattern for ``word`` with any of its letters percent-encoded, in either case:
    a server decodes ``%74oken=`` into ``token=`` (aiohttp's pure-Python parser logs
    a malformed request line as it came)."""
    return "".join(
        f"(?:{re.escape(c)}|%{ord(c.lower()):02x}|%{ord(c.upper()):02x})" for c in word
    )


_PATTERNS: tuple[re.Pattern[str], ...] = (
    # An Authorization header, whatever its scheme: raw, in a bytes repr or in a dict of headers.
    re.compile(r"""(?i)(\bauthorization['"]?\s*[:=]\s*['"]?)[^'"\r\n]+"""),
    # A bearer token quoted without its header name.
    re.compile(r"""(?i)(\bbearer(?:\s|\\t|%20|\+)+)[^\s'"&,;]+"""),
    # ?token=... (also access_token=..., and %74oken=...) in a URL or a request line.
    re.compile(rf"""(?i)({_maybe_percent_encoded("token")}(?:=|%3D))[^\s'"&#;]+"""),
)
# A bytes literal quoted by aiohttp's parser, with the caret line that points into it.
# The parser quotes only what arrived in the last TCP segment, which may start in the
# middle of a token, where no pattern above can recognise it: the whole literal goes.
_BYTES_LITERAL = re.compile(r"""\bb(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")(?:\n[ \t]*\^[ \t]*(?=\n|$))?""")
_AIOHTTP_LOGGERS = (
    aiohttp_log.access_logger,
    aiohttp_log.internal_logger,
    aiohttp_log.server_logger,
    aiohttp_log.web_logger,
)
_TRACEBACK_FORMATTER = logging.Formatter()


def _variants(secrets: Sequence[str]) -> tuple[str, ...]:
    found = set()
    for secret in secrets:
        if secret and len(secret) >= _MIN_SECRET_CHARS:
            found.update({secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)})
    # Longest first, so that no variant is left half replaced by a shorter one.
    return tuple(sorted(found, key=len, reverse=True))


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` with the given secrets, Authorization header values, bearer tokens and
    ``token=`` query values replaced by ``[REDACTED]``."""
    return _redact(text, _variants(secrets))


def _redact(text: str, variants: tuple[str, ...]) -> str:
    for secret in variants:
        text = text.replace(secret, REDACTED)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda match: match.group(1) + REDACTED, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message, traceback and stack so that they hold no token.

    On a logger it sees the records logged on that logger only; on a handler, every
    record that handler writes. A record with nothing to hide is left as it is
    (arguments and exception included), so other filters and handlers still see it.

    Args:
        secrets: Values known to be secret (the admin token), removed wherever they appear.
    """

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__()
        self._secrets = _variants(secrets)

    def _clean(self, text: str) -> str:
        return _redact(text, self._secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # any error here makes logging print the raw arguments to stderr
            record.msg = self._clean(str(record.msg)) + " [arguments not logged: they do not fit the message]"
            record.args = None
        else:
            clean = self._clean(message)
            if clean != message:
                record.msg, record.args = clean, None
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None or record.exc_text:
            text = record.exc_text or _TRACEBACK_FORMATTER.formatException(record.exc_info)  # type: ignore[arg-type]
            clean = self._clean(text)
            if isinstance(exc, HttpProcessingError):
                clean = _BYTES_LITERAL.sub(REQUEST_BYTES_NOT_LOGGED, clean)
            if clean != text:
                # Formatters print exc_text as it is; without exc_info none can render the original.
                record.exc_text, record.exc_info = clean, None
        if record.stack_info:
            record.stack_info = self._clean(record.stack_info)
        return True


@contextlib.contextmanager
def redacting_aiohttp_logs(secrets: Sequence[str] = ()) -> Iterator[RedactingFilter]:
    """Puts a :class:`RedactingFilter` on aiohttp's server-side loggers while the block runs."""
    redactor = RedactingFilter(secrets)
    for logger in _AIOHTTP_LOGGERS:
        logger.addFilter(redactor)
    try:
        yield redactor
    finally:
        for logger in _AIOHTTP_LOGGERS:
            logger.removeFilter(redactor)
