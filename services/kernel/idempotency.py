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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

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


def _reused(key: str) -> AlreadyExists:
    return AlreadyExists(f"idempotency_key: {key!r} was already used for a different request")


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
            raise _reused(key)
        return response_type.FromString(row["response"])
    response = await work()
    await conn.execute(
        "UPDATE idempotency_keys SET response = $2 WHERE key = $1",
        key,
        response.SerializeToString(deterministic=True),
    )
    return response


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The same request (key and body) as the batch's item ``index``: it gets that item's outcome."""

    index: int


async def claim_many(
    conn: asyncpg.Connection, method: str, requests: Sequence[Message], response_type: type[M]
) -> list[None | M | AlreadyExists | Duplicate]:
    """:func:`once` for a batch of requests (group commit), inside the caller's open
    transaction. Per request, in order: None when its key is now claimed by this
    transaction (do the work, then :func:`store_responses`, or :func:`forget` the key of
    a request that failed, so that it stores nothing); the stored response of a completed
    request; ALREADY_EXISTS when the key was used for another request; or
    :class:`Duplicate` when an earlier item of the batch has the same key and body. Keys
    are claimed in key order, so batches that share keys do not deadlock."""
    keys = [getattr(r, "idempotency_key") for r in requests]
    digests = [fingerprint(method, r) for r in requests]
    outcomes: list[None | M | AlreadyExists | Duplicate] = [None] * len(requests)
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        j = first.setdefault(key, i)
        if j != i:
            outcomes[i] = Duplicate(j) if digests[j] == digests[i] else _reused(key)
    ordered = sorted(first)
    inserted = set(await conn.fetchval(
        "WITH claimed AS (INSERT INTO idempotency_keys (key, method, request_hash)"
        " SELECT k, $2, h FROM unnest($1::text[], $3::bytea[]) AS u(k, h)"
        " ON CONFLICT DO NOTHING RETURNING key) SELECT coalesce(array_agg(key), '{}') FROM claimed",
        ordered, method, [digests[first[k]] for k in ordered],
    ))
    taken = [k for k in ordered if k not in inserted]
    if taken:
        rows = {r["key"]: r for r in await conn.fetch(
            "SELECT key, request_hash, response FROM idempotency_keys WHERE key = ANY($1::text[])", taken
        )}
        for key in taken:
            i, row = first[key], rows.get(key)
            if row is None or row["request_hash"] != digests[i] or row["response"] is None:
                outcomes[i] = _reused(key)
            else:
                outcomes[i] = response_type.FromString(row["response"])
    return outcomes


def with_duplicates(outcomes: Sequence[object]) -> list[object]:
    """Each :class:`Duplicate` of :func:`claim_many` given its original's outcome."""
    return [outcomes[o.index] if isinstance(o, Duplicate) else o for o in outcomes]


async def store_responses(conn: asyncpg.Connection, responses: Sequence[tuple[str, Message]]) -> None:
    """The responses of the requests :func:`claim_many` claimed (key, response)."""
    if responses:
        await conn.execute(
            "UPDATE idempotency_keys AS k SET response = u.response FROM unnest($1::text[], $2::bytea[]) AS u(key, response) WHERE k.key = u.key",
            [key for key, _ in responses], [r.SerializeToString(deterministic=True) for _, r in responses],
        )


async def forget(conn: asyncpg.Connection, keys: Sequence[str]) -> None:
    """Drop claimed keys of requests that failed: a failed request stores nothing."""
    if keys:
        await conn.execute("DELETE FROM idempotency_keys WHERE key = ANY($1::text[])", list(keys))


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
    return stored_response(row, method, request, response_type, key=key, field=field, shown=shown)


def stored_response(
    row: Mapping[str, Any] | None,
    method: str,
    request: Message,
    response_type: type[M],
    *,
    key: str | None = None,
    field: str = "idempotency_key",
    shown: str | None = None,
) -> M | None:
    """:func:`replay` from a key's row (its ``request_hash`` and ``response``, both None
    when there is no row) read by the caller together with other things."""
    if row is None or row["request_hash"] is None:
        return None
    if row["request_hash"] != fingerprint(method, request) or row["response"] is None:
        key = getattr(request, "idempotency_key") if key is None else key
        raise AlreadyExists(f"{field}: {(key if shown is None else shown)!r} was already used for a different request")
    return response_type.FromString(row["response"])
