"""Client idempotency keys for write RPCs.

The same key with the same request returns the first response; the same key with a
different request is refused with ALREADY_EXISTS and changes nothing. The key row is
inserted *before* the work, in the same transaction: a concurrent retry with the same
key waits on that row until the first attempt commits (then gets its response) or rolls
back (then does the work itself). A failed request stores nothing, so it may be retried.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from google.protobuf.message import Message

from services.kernel.errors import AlreadyExists, InvalidArgument

M = TypeVar("M", bound=Message)

MAX_KEY = 128
_KEY = re.compile(r"[\x21-\x7e]{1,128}")


def derived_key(namespace: str, prefix: str, *parts: object) -> str:
    """A deterministic idempotency key for a call a service makes on its own account (a
    wallet posting of a payout chunk, a redemption's release): ``<namespace>:<prefix>:<parts
    joined by ':'>``; over ``MAX_KEY`` characters, ``<namespace>:<prefix>:h:<sha256 of the
    parts>``. A retry derives the same key, so the callee applies the call once."""
    text = ":".join(str(p) for p in parts)
    key = f"{namespace}:{prefix}:{text}"
    return key if len(key) <= MAX_KEY else f"{namespace}:{prefix}:h:{hashlib.sha256(text.encode()).hexdigest()}"


def check_key(key: str) -> str:
    if not key:
        raise InvalidArgument("idempotency_key", "is required")
    if not _KEY.fullmatch(key):
        raise InvalidArgument("idempotency_key", "must be 1 to 128 printable ASCII characters without spaces")
    return key


def fingerprint(method: str, request: Message) -> bytes:
    """What makes two requests 'the same': the method and every field but the key."""
    body = type(request)()
    body.CopyFrom(request)
    if "idempotency_key" in body.DESCRIPTOR.fields_by_name:
        body.ClearField("idempotency_key")
    return hashlib.sha256(method.encode() + b"\0" + body.SerializeToString(deterministic=True)).digest()


async def once(
    conn: asyncpg.Connection,
    *,
    key: str,
    method: str,
    request: Message,
    response_type: type[M],
    work: Callable[[], Awaitable[M]],
) -> M:
    """Run ``work`` at most once per key; call inside an open transaction on ``conn``."""
    digest = fingerprint(method, request)
    inserted = await conn.fetchval(
        "INSERT INTO idempotency_keys (key, method, request_hash) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING RETURNING true",
        key,
        method,
        digest,
    )
    if not inserted:
        row = await conn.fetchrow(
            "SELECT request_hash, response FROM idempotency_keys WHERE key = $1", key
        )
        if row is None or row["request_hash"] != digest or row["response"] is None:
            raise AlreadyExists(f"idempotency_key: {key!r} was already used for a different request")
        return response_type.FromString(row["response"])
    response = await work()
    await conn.execute(
        "UPDATE idempotency_keys SET response = $2 WHERE key = $1",
        key,
        response.SerializeToString(deterministic=True),
    )
    return response


async def write_once(
    pool: asyncpg.Pool,
    *,
    method: str,
    request: Message,
    response_type: type[M],
    work: Callable[[asyncpg.Connection], Awaitable[M]],
) -> M:
    """The shape of every write RPC: check the key, then one transaction that runs
    ``work`` at most once per key. Validate the request *before* calling this, so that
    bad input writes nothing (not even the key)."""
    key = check_key(getattr(request, "idempotency_key"))
    async with pool.acquire() as conn, conn.transaction():
        return await once(conn, key=key, method=method, request=request, response_type=response_type, work=lambda: work(conn))


async def replay(
    conn: asyncpg.Connection | asyncpg.Pool,
    method: str,
    request: Message,
    response_type: type[M],
    *,
    key: str | None = None,
    field: str = "idempotency_key",
    shown: str | None = None,
) -> M | None:
    """The response a completed request under ``key`` (default: the request's
    ``idempotency_key``) stored, or None: a write that calls another service first (a
    wallet hold) answers a retry from here, without calling again nor meeting today's
    preconditions. The key used for another request: ALREADY_EXISTS naming ``field`` and
    ``shown`` (default: the key), e.g. the ``client_order_id`` a key derives from."""
    key = getattr(request, "idempotency_key") if key is None else key
    row = await conn.fetchrow("SELECT request_hash, response FROM idempotency_keys WHERE key = $1", key)
    if row is None:
        return None
    if row["request_hash"] != fingerprint(method, request) or row["response"] is None:
        raise AlreadyExists(f"{field}: {(key if shown is None else shown)!r} was already used for a different request")
    return response_type.FromString(row["response"])
