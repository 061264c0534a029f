"""Token redaction (sinks/tinybird/_http/redaction.py): scrubbing before capping, every
spelling of the token, and the log filter's life on the HTTP stack's loggers."""

from __future__ import annotations

import json
import logging
import urllib.parse

import pytest
from shared_testlib import TOKEN

from sinks.tinybird._http.redaction import Redactor, install_log_redaction, uninstall_log_redaction

ODD_TOKEN = 'p.odd"\\token/with%chars'


def test_scrubs_every_spelling_of_the_token():
    redactor = Redactor([ODD_TOKEN])
    texts = {
        "as is": f"bad token {ODD_TOKEN}!",
        "json": 'bad token p.odd\\"\\\\token/with%chars!',
        "repr": f"unparsed data: {ODD_TOKEN.encode()!r}",
        "percent-encoded": "url?token=p.odd%22%5Ctoken%2Fwith%25chars",
    }
    for where, text in texts.items():
        scrubbed = redactor.scrub(text)
        assert "***" in scrubbed and "token/with" not in scrubbed, where


def test_scrubs_before_capping():
    text = "x" * 990 + TOKEN
    assert Redactor([TOKEN]).bounded(text, 1000) == "x" * 990 + "***"
    # Capping first would have kept the token's first 7 characters.
    assert TOKEN[:7] not in Redactor([TOKEN]).bounded("x" * 990 + TOKEN + "y" * 100, 1000)
    assert repr(Redactor([TOKEN])) == "Redactor(1 spellings)"  # never the token itself
    assert repr(Redactor([ODD_TOKEN])) == "Redactor(4 spellings)"


def test_the_log_filter_is_shared_counted_and_removed_with_the_last_token(caplog):
    caplog.set_level(logging.DEBUG)
    pool_logger = logging.getLogger("urllib3.connectionpool")
    # Clients that Beam never tore down (it does not always call teardown) may keep
    # registrations of other tokens open: the filter is then there before and after.
    before = list(pool_logger.filters)
    install_log_redaction(TOKEN)
    install_log_redaction(TOKEN)
    install_log_redaction("p.other-token-123")
    try:
        assert len(pool_logger.filters) == 1  # one filter, however many clients
        pool_logger.warning("echo %s and %s", TOKEN, "p.other-token-123")
        try:
            raise ValueError(f"unparsed data: {TOKEN!r}")
        except ValueError:
            pool_logger.warning("failed", exc_info=True)
        uninstall_log_redaction(TOKEN)
        uninstall_log_redaction("p.other-token-123")
        assert len(pool_logger.filters) == 1  # one registration of TOKEN is still open
        pool_logger.warning("still %s", TOKEN)
    finally:
        uninstall_log_redaction(TOKEN)
    assert pool_logger.filters == before
    assert [r.getMessage() for r in caplog.records] == ["echo *** and ***", "failed", "still ***"]
    assert "ValueError: unparsed data: '***'" in caplog.records[1].exc_text
    assert TOKEN not in caplog.text and "p.other-token-123" not in caplog.text


@pytest.mark.parametrize("token", [TOKEN, ODD_TOKEN, "p.eyJ1IjogIjQ2YzdjMGM0In0.SIGnatureXYZ"])
@pytest.mark.parametrize("case", [str.upper, str.lower, str.swapcase, str.title])
def test_scrubs_every_spelling_of_the_token_in_any_case(token, case):
    redactor = Redactor([token])
    spellings = [token, json.dumps(token)[1:-1], repr(token)[1:-1], repr(token.encode())[2:-1],
                 urllib.parse.quote(token, safe="")]
    for spelling in spellings:
        text = case(f"echo: {spelling}!")
        scrubbed = redactor.bounded(text, 1000)
        assert scrubbed == case("echo: ") + "***" + "!", (spelling, scrubbed)
    # Capped after scrubbing: no part of the token is left.
    assert redactor.bounded("x" * 30 + case(token) + "y" * 100, 40) == "x" * 30 + "***" + "y" * 4 + "..."
