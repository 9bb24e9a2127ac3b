"""Batches of one payout and product recorded at the same time (Simple Earn's store, on a
real PostgreSQL): each batch checks its items against ``positions`` outside the payout's
lock and records under it, so a position that several batches list (a misbehaving engine)
is recorded, and paid, by exactly one of them, whatever the interleaving."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal

from services.kernel import db
from services.simple_earn import domain, store
from services.simple_earn.main import MIGRATIONS, SCHEMA

POSITIONS = 300
BATCHES = 6  # as many as the engine's partitions, all listing every position


async def test_concurrent_batches_record_each_position_once(stack) -> None:
    await db.migrate(stack.settings, SCHEMA, MIGRATIONS)
    pool = await db.create_pool(stack.settings, SCHEMA, min_size=BATCHES, max_size=BATCHES)
    try:
        at = datetime.now(UTC)
        await pool.execute(
            "INSERT INTO products (product_id, asset, kind, status, tiers, min_subscription, payout_cadence, created_at, updated_at)"
            " VALUES ('race', 'USDT', 'flexible', 'active', '[]', 1, 'daily', $1, $1)", at,
        )
        ids = [
            await pool.fetchval(
                "INSERT INTO positions (user_id, product_id, asset, kind, principal, status, accrues_from_hour, opened_at, updated_at, auto_subscribe)"
                " VALUES ($1, 'race', 'USDT', 'flexible', 100, 'active', 10, $2, $2, $3) RETURNING id", f"u{i}", at, i % 50 == 0,
            )
            for i in range(POSITIONS)
        ]
        amount = {pid: Decimal(i + 1) / 1000 for i, pid in enumerate(ids)}
        users = {pid: f"u{i}" for i, pid in enumerate(ids)}
        job = "simple_earn.interest.daily"
        for round_ in range(5):
            period = f"2026-02-{round_ + 1:02d}"
            payout = await store.payout_id(pool, job, period)
            orders = [sorted(ids)] * BATCHES  # every batch lists every position, in id order

            async def record(partition: int, order: list[int], period: str = period, payout: int = payout) -> store.RecordedBatch | None:
                return await store.record_payout_batch(
                    pool, job=job, period=period, payout=payout, partition=partition, sequence=0, last=True, product_id="race",
                    asset="USDT", boundary_hour=34 + round_, digest=b"d", at=at, consumer=domain.PAYOUT_CONSUMER,
                    event_id=str(uuid.uuid4()), position_ids="\n".join(map(str, order)), user_ids="\n".join(users[p] for p in order),
                    amounts="\n".join(str(amount[p]) for p in order), from_hours=[10] * len(order), sent=None, excluded=[], problems=None,
                )

            recorded = await asyncio.gather(*(record(p, order) for p, order in enumerate(orders)))
            assert all(r is not None for r in recorded)
            assert sum(r.items for r in recorded) == POSITIONS  # type: ignore[union-attr]
            assert sum(r.paid for r in recorded) == sum(amount.values())  # type: ignore[union-attr]
            assert sum(len(r.excluded) for r in recorded) == (BATCHES - 1) * POSITIONS  # type: ignore[union-attr]
            # Every position is in exactly one of the payout's chunks, with its amount once.
            rows = await pool.fetch(
                "SELECT u.pos, u.amount FROM payout_items b, unnest(b.position_ids, b.amounts) AS u(pos, amount) WHERE b.payout_id = $1",
                payout,
            )
            assert sorted((r["pos"], r["amount"]) for r in rows) == sorted(amount.items())
            # Reinvestments are decided once too: by the batch that recorded the position.
            reinvested = [p for r in recorded for p in r.reinvest]  # type: ignore[union-attr]
            assert sorted(reinvested) == [pid for i, pid in enumerate(ids) if i % 50 == 0]
        for pid in ids[:: POSITIONS // 10]:
            assert (await store.get_position(pool, pid, None))["interest_paid"] == amount[pid] * 5
    finally:
        await pool.close()
