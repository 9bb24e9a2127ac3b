"""Pagination of list RPCs: page sizes and opaque page tokens, the same in every service.

A token names the list it belongs to (``kind``) and the last id of the page; a token of
another list, or one this service did not issue, is INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64

from services.kernel.errors import InvalidArgument

MAX_PAGE = 1000
DEFAULT_PAGE = 100


def page_size(value: int) -> int:
    if value > MAX_PAGE:
        raise InvalidArgument("page_size", f"at most {MAX_PAGE}")
    return value or DEFAULT_PAGE


def token(kind: str, last_id: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{last_id}".encode()).decode()


def after(page_token: str, kind: str) -> int:
    """The last id of the previous page (0 for the first page)."""
    if not page_token:
        return 0
    try:
        prefix, _, value = base64.urlsafe_b64decode(page_token.encode()).decode().partition(":")
        if prefix != kind or not (value.isascii() and value.isdigit()) or int(value) >= 2**63:  # ids are BIGINT
            raise ValueError
        return int(value)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token", "is not a token this service issued for this list") from None
