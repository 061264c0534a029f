"""Tokens and scopes, persisted in ``DATA_DIR/tokens.json``.

Only a SHA-256 of each token is stored. Lookups compare digests with
``hmac.compare_digest`` against every stored token, so the time taken does not
depend on how much of a guess is right. Scopes mirror Tinybird's: ``ADMIN``,
``DATASOURCE:APPEND[:name]``, ``DATASOURCE:CREATE``, ``DATASOURCE:READ[:name]``
(the plural ``DATASOURCES:`` spelling of Tinybird's Tokens API is accepted).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Sequence

__all__ = ["ADMIN_TOKEN_ENV", "Scope", "TokenInfo", "TokenStore", "generate_token", "parse_scope"]

_LOG = logging.getLogger(__name__)

TOKENS_FILE = "tokens.json"
# `serve` reads its admin token from here when --token is not given.
ADMIN_TOKEN_ENV = "TB_LOCAL_ADMIN_TOKEN"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
_TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")

ADMIN = "ADMIN"
APPEND = "DATASOURCE:APPEND"
CREATE = "DATASOURCE:CREATE"
READ = "DATASOURCE:READ"


@dataclasses.dataclass(frozen=True)
class Scope:
    """One scope: a kind and, for APPEND and READ, an optional data source."""

    kind: str
    resource: str | None = None

    def __str__(self) -> str:
        return self.kind if self.resource is None else f"{self.kind}:{self.resource}"


def parse_scope(text: str) -> Scope:
    """Parses ``ADMIN``, ``DATASOURCE:APPEND:events``... into a Scope; ValueError otherwise."""
    raw = text.strip()
    parts = raw.split(":")
    if parts[0].upper() == "DATASOURCES":
        parts[0] = "DATASOURCE"
    head = parts[0].upper()
    if head == "ADMIN" and len(parts) == 1:
        return Scope(ADMIN)
    if head == "DATASOURCE" and len(parts) in (2, 3):
        kind = f"DATASOURCE:{parts[1].upper()}"
        resource = parts[2] if len(parts) == 3 else None
        if kind == CREATE and resource is None:
            return Scope(CREATE)
        if kind in (APPEND, READ):
            if resource is not None and not _NAME_RE.match(resource):
                raise ValueError(f"invalid data source name in scope {text!r}")
            return Scope(kind, resource)
    raise ValueError(
        f"unknown scope {text!r}; expected ADMIN, DATASOURCE:APPEND[:name], "
        "DATASOURCE:CREATE or DATASOURCE:READ[:name]"
    )


def generate_token() -> str:
    return "tb_local_" + secrets.token_urlsafe(32)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """What a token may do. Never holds the token itself."""

    name: str
    scopes: frozenset[Scope]

    @property
    def is_admin(self) -> bool:
        return Scope(ADMIN) in self.scopes

    def can_append(self, datasource: str) -> bool:
        # Tinybird: DATASOURCES:CREATE "enables your token to create and append data to data sources".
        return (
            self.is_admin
            or Scope(CREATE) in self.scopes
            or Scope(APPEND) in self.scopes
            or Scope(APPEND, datasource) in self.scopes
        )

    def can_create(self) -> bool:
        return self.is_admin or Scope(CREATE) in self.scopes

    def readable(self) -> frozenset[str] | None:
        """Data sources this token may read: ``None`` for all, else a set (maybe empty)."""
        if self.is_admin or Scope(READ) in self.scopes:
            return None
        return frozenset(s.resource for s in self.scopes if s.kind == READ and s.resource)


class TokenStore:
    """The admin token of this run plus the tokens persisted in the data dir."""

    def __init__(self, data_dir: str, *, admin_token: str | None = None) -> None:
        self._path = os.path.join(data_dir, TOKENS_FILE)
        self._lock_path = self._path + ".lock"
        self._lock = threading.Lock()
        self._admin_digest = _digest(admin_token) if admin_token else None
        self._entries: list[tuple[bytes, TokenInfo]] = []
        self._mtime_ns: int | None = None
        self._reload()

    # -- reading -----------------------------------------------------------

    def _reload(self) -> None:
        try:
            mtime_ns = os.stat(self._path).st_mtime_ns
        except FileNotFoundError:
            self._entries, self._mtime_ns = [], None
            return
        if mtime_ns == self._mtime_ns:
            return
        self._entries = self._read_entries()
        self._mtime_ns = mtime_ns

    def _read_entries(self) -> list[tuple[bytes, TokenInfo]]:
        try:
            with open(self._path, encoding="utf-8") as fh:
                doc = json.load(fh)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            _LOG.error("cannot read %s: %s", self._path, exc)
            return self._entries
        entries = []
        for item in doc.get("tokens", []):
            try:
                scopes = frozenset(parse_scope(s) for s in item["scopes"])
                entries.append((bytes.fromhex(item["sha256"]), TokenInfo(item["name"], scopes)))
            except (KeyError, TypeError, ValueError) as exc:
                _LOG.error("skipping a malformed entry of %s: %s", self._path, exc)
        return entries

    def _match(self, digest: bytes) -> TokenInfo | None:
        found: TokenInfo | None = None
        # No early exit: every stored digest is compared.
        if self._admin_digest is not None and hmac.compare_digest(digest, self._admin_digest):
            found = TokenInfo("admin", frozenset({Scope(ADMIN)}))
        for stored, info in self._entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = info
        return found

    def lookup(self, token: str | None) -> TokenInfo | None:
        """The token's scopes, or None when it is unknown."""
        if not token:
            return None
        digest = _digest(token)
        with self._lock:
            found = self._match(digest)
            if found is None:
                # Tokens created by the CLI while the server runs.
                self._reload()
                found = self._match(digest)
        return found

    # -- writing -----------------------------------------------------------

    def create(self, *, name: str, scopes: Sequence[str]) -> tuple[str, TokenInfo]:
        """Creates and persists a token; returns it with its info. ValueError on bad input."""
        if not _TOKEN_NAME_RE.match(name or ""):
            raise ValueError(f"invalid token name {name!r}: use 1-100 of A-Z a-z 0-9 _ . -")
        if not scopes:
            raise ValueError("a token needs at least one scope")
        parsed = [parse_scope(s) for s in scopes]
        token = generate_token()
        info = TokenInfo(name, frozenset(parsed))
        with self._lock, open(self._lock_path, "a+") as lock_fh:
            fcntl.flock(lock_fh, fcntl.LOCK_EX)
            try:
                with open(self._path, encoding="utf-8") as fh:
                    doc = json.load(fh)
            except FileNotFoundError:
                doc = {"tokens": []}
            if any(item.get("name") == name for item in doc.get("tokens", [])):
                raise ValueError(f"a token named {name!r} already exists")
            doc.setdefault("tokens", []).append(
                {"name": name, "sha256": _digest(token).hex(), "scopes": [str(s) for s in parsed]}
            )
            tmp = f"{self._path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._path)
            self._mtime_ns = None
            self._reload()
        _LOG.info("created token %r with scopes %s", name, [str(s) for s in parsed])
        return token, info
