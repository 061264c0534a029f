"""Where the token comes from: a value, an environment variable, or Secret Manager.

The token is resolved on the worker, in ``setup()``, so that it need not sit in
pipeline options or the job graph. Nothing here logs or shows it.
"""

from __future__ import annotations

import dataclasses
import os
import re

DEFAULT_TOKEN_ENV = "TINYBIRD_TOKEN"
# A part of the name: no '/', no space. Python's \s is every Unicode space; the Flex Templates' regex
# is this one, and Dataflow reads it as Java, whose \s is ASCII only: the others are written out.
_NAME_PART = r"[^/\s\x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+"
_SECRET_VERSION = re.compile(rf"^projects/{_NAME_PART}/secrets/{_NAME_PART}/versions/{_NAME_PART}$")
# POSIX shell names: what ``export NAME=...`` and Dataflow's worker environment accept.
_ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _unshown(value: object) -> str:
    """What is wrong with a value given where an environment variable's name belongs, without
    showing it: a token pasted into ``token_env`` must not reach the error message."""
    if not isinstance(value, str):
        return type(value).__name__
    if not value:
        return "''"
    bad = next((i for i, c in enumerate(value) if not (c.isascii() and (c.isalnum() or c == "_"))), None)
    if bad is not None:
        where = f", {value[bad]!r} at position {bad}"
    else:
        where = ", starting with a digit" if value[0].isdigit() else ""
    return f"{len(value)} characters{where} (the value is not shown: it may be a token)"


def _unshown_secret(value: object) -> str:
    """What is wrong with a value given as a secret version, without showing it (it may be a token):
    its shape, which the six parts of ``projects/PROJECT/secrets/NAME/versions/VERSION`` are not."""
    if not isinstance(value, str):
        return type(value).__name__
    if not value:
        return "''"
    space = next((i for i, c in enumerate(value) if c.isspace()), None)
    if space is not None:
        where = f", a space at position {space}"
    else:
        parts = value.split("/")
        where = f", {len(parts)} part{'s' if len(parts) != 1 else ''} between '/'"
        if any(not part for part in parts):
            where += ", one of them empty"
        elif len(parts) == 6:
            # The fixed words (never a token's text) may be named.
            wrong = [f"part {i + 1} is not {word!r}" for i, word in ((0, "projects"), (2, "secrets"), (4, "versions"))
                     if parts[i] != word]
            where += "".join(f", {text}" for text in wrong)
    return f"{len(value)} characters{where} (the value is not shown: it may be a token)"


class TokenError(RuntimeError):
    """No token could be found where the sink was told to look."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenSource:
    """One of: a token value, a Secret Manager secret version, an environment variable."""

    value: str | None = dataclasses.field(default=None, repr=False)
    secret_version: str | None = None
    env_var: str = DEFAULT_TOKEN_ENV

    def __post_init__(self) -> None:
        if self.value is not None and (not isinstance(self.value, str) or not self.value.strip()):
            raise ValueError("token must be a non-empty string (its value is not shown)")
        if self.value is not None and self.secret_version is not None:
            raise ValueError("give either token or token_secret, not both")
        if self.secret_version is not None and not _SECRET_VERSION.fullmatch(self.secret_version):
            raise ValueError(
                "token_secret must be a Secret Manager secret version, "
                f"projects/PROJECT/secrets/NAME/versions/VERSION, got {_unshown_secret(self.secret_version)}")
        if not isinstance(self.env_var, str) or not _ENV_VAR_NAME.fullmatch(self.env_var):
            raise ValueError(
                "token_env must be an environment variable name (letters, digits and _, not starting "
                f"with a digit), got {_unshown(self.env_var)}")

    def resolve(self) -> str:
        """The token; raises :class:`TokenError` saying where it looked."""
        if self.value is not None:
            return self.value.strip()
        if self.secret_version is not None:
            return _read_secret(self.secret_version)
        token = os.environ.get(self.env_var, "").strip()
        if not token:
            raise TokenError(
                f"no Tinybird token: pass token= or token_secret=, or set {self.env_var} on the workers")
        return token


def _read_secret(version: str) -> str:
    try:
        from google.cloud import secretmanager
    except ImportError as error:
        raise TokenError(
            "token_secret needs google-cloud-secret-manager: pip install 'beam-tinybird[gcp]'") from error
    client = secretmanager.SecretManagerServiceClient()
    token = client.access_secret_version(name=version).payload.data.decode("utf-8").strip()
    if not token:
        raise TokenError(f"the secret version {version} is empty")
    return token
