"""The inbox: consumers apply each event id once.

Call :func:`first_time` inside the transaction that applies the event's effect; when it
returns False the event was applied before and the caller skips it. Redelivery after a
crash is then harmless.
"""

from __future__ import annotations

import asyncpg


async def first_time(conn: asyncpg.Connection, consumer: str, event_id: str) -> bool:
    row = await conn.fetchval(
        "INSERT INTO inbox (consumer, event_id) VALUES ($1, $2::uuid)"
        " ON CONFLICT DO NOTHING RETURNING true",
        consumer,
        event_id,
    )
    return bool(row)
