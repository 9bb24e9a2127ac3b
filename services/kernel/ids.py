"""Identifiers and short text fields: one grammar each, one message each.

Every service checks its ids the same way: empty is "is required", anything else that
does not fully match the grammar gets the rule in words. The grammars here are the
ones several services share (a wallet owner is a user id; a scheduler job and period
reach every service that takes payouts); a service with an id of its own length calls
:func:`check` with its own pattern and rule.
"""

from __future__ import annotations

import re
from functools import cache

from services.kernel.errors import InvalidArgument

ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# The grammar of a wallet owner: the user id owns the wallet accounts.
USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}")
JOB = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
PERIOD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:T-]{0,31}")


def check(pattern: re.Pattern[str], value: str, field: str, rule: str) -> str:
    """``value`` if it fully matches ``pattern``; ``InvalidArgument(field, rule)`` if not."""
    if not value:
        raise InvalidArgument(field, "is required")
    if not pattern.fullmatch(value):
        raise InvalidArgument(field, rule)
    return value


def check_id(value: str, field: str) -> str:
    return check(ID, value, field, "must be 1 to 64 characters of letters, digits and _ . - (starting with a letter or digit)")


def check_user_id(value: str, field: str = "user_id") -> str:
    return check(USER_ID, value, field, "must be 1 to 64 characters of letters, digits and _ . : @ - (starting with a letter or digit)")


def check_job(value: str, field: str = "job") -> str:
    return check(JOB, value, field, "must be 1 to 64 characters of letters, digits and _ . : -")


def check_period(value: str, field: str = "period") -> str:
    return check(PERIOD, value, field, "must be 1 to 32 characters of letters, digits and _ . : T -")


def parse_serial(text: str, field: str) -> int:
    """A database id (BIGINT, from 1) sent as decimal text."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) >= 2**63 or int(text) == 0:
        raise InvalidArgument(field, "must be a positive decimal id")
    return int(text)


def check_printable(value: str, field: str, max_length: int) -> str:
    """1 to ``max_length`` printable ASCII characters without spaces (client order ids,
    event ids: whatever the caller's own system produced)."""
    return check(_printable(max_length), value, field, f"must be 1 to {max_length} printable ASCII characters without spaces")


@cache
def _printable(max_length: int) -> re.Pattern[str]:
    return re.compile(rf"[\x21-\x7e]{{1,{max_length}}}")
