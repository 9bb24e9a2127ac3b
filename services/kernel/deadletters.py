"""Dead letters: a consumed Kafka record that cannot be read (or applied) is parked in the
service's own ``dead_letters`` table, never skipped silently.

Every service that parks has the table in its schema with at least these columns and a
unique key (primary key or unique constraint) on ``(topic, "partition", "offset")``::

    CREATE TABLE dead_letters (
        topic        text        NOT NULL,
        "partition"  integer     NOT NULL,
        "offset"     bigint      NOT NULL,
        error        text        NOT NULL,
        raw          bytea       NOT NULL,
        parked_at    timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (topic, "partition", "offset")
    );

``raw`` is the record's value exactly as consumed, so it can be inspected and replayed.
Parking is idempotent per record: a redelivery (a restart before the offset was
committed) parks nothing twice.
"""

from __future__ import annotations

import asyncpg

ERROR_MAX = 2000  # characters of the error kept


async def park(conn: asyncpg.Connection | asyncpg.Pool, topic: str, partition: int, offset: int, error: str, raw: bytes) -> bool:
    """Park one record; True when it is new, False when it was parked before."""
    return bool(await conn.fetchval(
        'INSERT INTO dead_letters (topic, "partition", "offset", error, raw) VALUES ($1, $2, $3, $4, $5)'
        ' ON CONFLICT (topic, "partition", "offset") DO NOTHING RETURNING true',
        topic, partition, offset, error[:ERROR_MAX], raw,
    ))
