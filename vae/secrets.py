"""Credentials never leave the process: every URI or message that can carry one is redacted before it
is logged, printed or stored (model.json, MLflow parameters and tags, decisions, Iceberg properties).

Covered forms: a URI's password (`scheme://user:pw@host`, `scheme://:pw@host`), and key=value pairs
whose key names a secret, in query strings and connection strings (`?password=pw`, Redis's
`host:6379,password=pw`, `token=`, `secret=`, AWS's `X-Amz-Signature=`...). Also, exactly, the value
of any environment variable that holds a credential (`PGPASSWORD`, `AWS_SECRET_ACCESS_KEY`, ...),
wherever it shows up.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any

MASK = "***"
_URI_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s/]+@")
_SECRET_KEY = r"[a-z0-9_.-]*?(?:password|passwd|pwd|secret|token|api[_-]?key|signature|credential)s?"
_SECRET_PAIR = re.compile(rf"(?i)\b({_SECRET_KEY})(=)()[^&,;\s'\"]+")  # key=value
_SECRET_JSON = re.compile(rf'(?i)("{_SECRET_KEY}"\s*:\s*)(")()[^"]+')  # "key": "value"
# Environment variables whose whole value is a credential (beside any *PASSWORD*, *SECRET*, *TOKEN*).
_SECRET_ENV = re.compile(r"(?i)(password|secret|token|credential|private_key|hmac_key|signing_key)")
_CONNECTION_ENV = ("REDIS_CONNECTION_STRING", "MLFLOW_TRACKING_URI", "DATABASE_URL")


def redact(text: str) -> str:
    """The text with every credential in it replaced by ***."""
    if not text:
        return text
    # each pattern only where its anchor character is: this runs for every log record
    if "@" in text:
        text = _URI_PASSWORD.sub(rf"\g<1>{MASK}@", text)
    if "=" in text:
        text = _SECRET_PAIR.sub(rf"\g<1>\g<2>{MASK}", text)
    if '"' in text:
        text = _SECRET_JSON.sub(rf"\g<1>\g<2>{MASK}", text)
    for value in _secret_values():
        text = text.replace(value, MASK)
    return text


def holds_credentials(uri: str) -> bool:
    """Whether a URI carries a password or token (so it must not be written into config or a registry)."""
    return any(pattern.search(uri) for pattern in (_URI_PASSWORD, _SECRET_PAIR, _SECRET_JSON))


def redact_values(value: Any) -> Any:
    """A JSON-like value (dicts, lists, strings) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_values(item) for item in value)
    return value


def _secret_values() -> tuple[str, ...]:
    """Values of the environment's credential variables (8 characters or more: shorter ones would mask
    ordinary words), longest first, and the passwords inside its connection strings. Cached on what
    they are computed from: this runs for every log record."""
    names = _credential_names(tuple(os.environ))
    return _values(
        tuple(os.environ.get(name, "") for name in names),
        tuple(os.environ.get(name, "") for name in _CONNECTION_ENV),
    )


@functools.lru_cache(maxsize=16)
def _credential_names(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name for name in names if _SECRET_ENV.search(name))


@functools.lru_cache(maxsize=16)
def _values(credentials: tuple[str, ...], connections: tuple[str, ...]) -> tuple[str, ...]:
    values = list(credentials)
    for connection in connections:
        for match in _URI_PASSWORD.finditer(connection):
            values.append(match.group(0)[len(match.group(1)) : -1])
        for match in _SECRET_PAIR.finditer(connection):
            values.append(match.group(0).split("=", 1)[1])
    return tuple(sorted({v for v in values if len(v) >= 8}, key=len, reverse=True))


class _RedactingRecords:
    """A log record factory that redacts each record's message once, for every logger and handler."""

    def __init__(self, factory):
        self.factory = factory

    def __call__(self, *args, **kwargs) -> logging.LogRecord:
        record = self.factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not fit its format: logging reports it later
            return record
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        if record.exc_info and not record.exc_text:  # the traceback, formatted once here, redacted
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record


def redact_logs() -> None:
    """Redact every log record of this process from now on (idempotent)."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingRecords):
        logging.setLogRecordFactory(_RedactingRecords(factory))
