"""Market SQL: ticks under their natural key, the consumer's inbox, the window queries."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import asyncpg

from services.market.domain import Tick

Conn = asyncpg.Connection | asyncpg.Pool
CONSUMER = "market.prices"


@dataclass(frozen=True, slots=True)
class NewTick:
    pair: str
    at_us: int
    price: Decimal
    source: str
    event_id: uuid.UUID | None


async def insert_ticks(conn: asyncpg.Connection, ticks: Sequence[NewTick]) -> list[NewTick]:
    """Store ticks once per event id (inbox) and once per (pair, at_us); call inside a
    transaction. Returns the ticks stored now."""
    with_id = [t for t in ticks if t.event_id is not None]
    fresh_ids: set[uuid.UUID] = set()
    if with_id:
        rows = await conn.fetch(
            "INSERT INTO inbox (consumer, event_id) SELECT $1, e FROM unnest($2::uuid[]) AS e"
            " ON CONFLICT DO NOTHING RETURNING event_id",
            CONSUMER, [t.event_id for t in with_id],
        )
        fresh_ids = {r["event_id"] for r in rows}
    todo = [t for t in ticks if t.event_id is None or t.event_id in fresh_ids]
    if not todo:
        return []
    rows = await conn.fetch(
        "INSERT INTO ticks (pair, at_us, price, source, event_id)"
        " SELECT * FROM unnest($1::text[], $2::bigint[], $3::numeric[], $4::text[], $5::uuid[])"
        " ON CONFLICT (pair, at_us) DO NOTHING RETURNING pair, at_us",
        [t.pair for t in todo], [t.at_us for t in todo], [t.price for t in todo], [t.source for t in todo], [t.event_id for t in todo],
    )
    stored = {(r["pair"], r["at_us"]) for r in rows}
    return [t for t in todo if (t.pair, t.at_us) in stored]


async def latest(conn: Conn, pair: str, at_us: int | None = None) -> asyncpg.Record | None:
    if at_us is None:
        return await conn.fetchrow("SELECT pair, at_us, price, source FROM ticks WHERE pair = $1 ORDER BY at_us DESC LIMIT 1", pair)
    return await conn.fetchrow(
        "SELECT pair, at_us, price, source FROM ticks WHERE pair = $1 AND at_us <= $2 ORDER BY at_us DESC LIMIT 1", pair, at_us
    )


async def window(conn: Conn, pair: str, start_us: int, end_us: int) -> list[Tick]:
    """The tick in force at ``start_us`` (if any) and every tick in (start_us, end_us), in time order."""
    rows = await conn.fetch(
        "(SELECT at_us, price FROM ticks WHERE pair = $1 AND at_us <= $2 ORDER BY at_us DESC LIMIT 1)"
        " UNION ALL"
        " (SELECT at_us, price FROM ticks WHERE pair = $1 AND at_us > $2 AND at_us < $3 ORDER BY at_us)",
        pair, start_us, end_us,
    )
    return sorted((Tick(r["at_us"], r["price"]) for r in rows), key=lambda t: t.at_us)

