"""JSON logs on stderr, one object per line, for every process.

Secrets never reach a log line: a filter on the handler masks bearer tokens and PEM
private keys in the message and in every string field, and drops the value of any field
whose name says it holds a secret (token, authorization, key, password, secret).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

from pythonjsonlogger.json import JsonFormatter


REDACTED = "[redacted]"
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\",]+")
_PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S)
_SECRET_FIELD = re.compile(r"(?i)(token|authorization|private_key|password|secret|^key$)")
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def redact(text: str) -> str:
    """``text`` with bearer tokens and PEM private keys replaced by [redacted]."""
    return _PEM_KEY.sub(REDACTED, _BEARER.sub(lambda m: m.group(1) + REDACTED, text))


class RedactSecrets(logging.Filter):
    """Masks secrets in a record before any formatter sees it (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg, record.args = record.getMessage(), None
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        for name, value in list(record.__dict__.items()):
            if name in _STANDARD:
                continue
            if _SECRET_FIELD.search(name) and name != "token_hint":
                setattr(record, name, REDACTED)
            elif isinstance(value, str):
                setattr(record, name, redact(value))
        return True


def _redacted_exception(formatter: Any) -> Any:
    base = formatter.formatException

    def format_exception(ei: Any) -> str:
        return redact(base(ei))

    return format_exception


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactSecrets())
    formatter = JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        timestamp=False,
    )
    formatter.formatException = _redacted_exception(formatter)  # type: ignore[method-assign]
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Chatty clients: their warnings matter, their info does not.
    for noisy in ("aiokafka", "kafka", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
