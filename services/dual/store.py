"""Dual Investment SQL."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import asyncpg

from services.dual.domain import Direction, Plan
from services.kernel.errors import NotFound

Conn = asyncpg.Connection | asyncpg.Pool


def plan_of(row: asyncpg.Record) -> Plan:
    return Plan(
        row["plan_id"], row["base_asset"], row["quote_asset"], Direction(row["direction"]), row["strike"], row["apr"], row["settle_us"],
        row["window_seconds"], row["min_amount"], row["max_per_user"], row["quota"],
    )


async def insert_plan(conn: asyncpg.Connection, plan: Plan, at: datetime) -> bool:
    done = await conn.fetchval(
        "INSERT INTO plans (plan_id, base_asset, quote_asset, direction, strike, apr, settle_us, window_seconds, min_amount,"
        " max_per_user, quota, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        " ON CONFLICT (plan_id) DO NOTHING RETURNING true",
        plan.plan_id, plan.base, plan.quote, plan.direction.value, plan.strike, plan.apr, plan.settle_us, plan.window_seconds,
        plan.min_amount, plan.max_per_user, plan.quota, at,
    )
    return bool(done)


async def plan(conn: Conn, plan_id: str, *, lock: bool = False) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM plans WHERE plan_id = $1" + (" FOR UPDATE" if lock else ""), plan_id)
    if row is None:
        raise NotFound(f"plan_id: no plan {plan_id}")
    return row


async def plans(conn: Conn, base: str, quote: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM plans WHERE ($1 = '' OR base_asset = $1) AND ($2 = '' OR quote_asset = $2) ORDER BY settle_us, plan_id", base, quote
    )


async def user_total(conn: Conn, plan_id: str, user_id: str) -> Decimal:
    value = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM subscriptions WHERE plan_id = $1 AND user_id = $2", plan_id, user_id)
    return Decimal(value)


async def hold_abandoned(conn: Conn, hold_id: int) -> bool:
    return bool(await conn.fetchval("SELECT true FROM abandoned_holds WHERE hold_id = $1", hold_id))


async def insert_subscription(
    conn: asyncpg.Connection, plan_id: str, user_id: str, order_id: str, amount: Decimal, at_us: int, hold_id: int
) -> asyncpg.Record | None:
    """None when the hold was abandoned (or is used) meanwhile."""
    if await hold_abandoned(conn, hold_id):
        return None
    row = await conn.fetchrow(
        "INSERT INTO subscriptions (plan_id, user_id, client_order_id, amount, subscribed_us, hold_id)"
        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING *",
        plan_id, user_id, order_id, amount, at_us, hold_id,
    )
    if row is not None:
        await conn.execute("UPDATE plans SET subscribed = subscribed + $2 WHERE plan_id = $1", plan_id, amount)
    return row


async def abandon_hold(conn: asyncpg.Connection, hold_id: int, amount: Decimal, reason: str) -> bool:
    """Claim a hold as abandoned unless a subscription uses it; True when it must be released."""
    if await conn.fetchval("SELECT true FROM subscriptions WHERE hold_id = $1", hold_id):
        return False
    await conn.execute(
        "INSERT INTO abandoned_holds (hold_id, amount, reason) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING", hold_id, amount, reason[:500]
    )
    return True


async def unreleased_holds(conn: Conn) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT hold_id, amount FROM abandoned_holds WHERE NOT released ORDER BY hold_id LIMIT 100")


async def hold_released(conn: Conn, hold_id: int) -> None:
    await conn.execute("UPDATE abandoned_holds SET released = true WHERE hold_id = $1", hold_id)


async def subscription(conn: Conn, subscription_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM subscriptions WHERE id = $1", subscription_id)


async def list_subscriptions(conn: Conn, user: str, plan_id: str, status: str, after: int, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM subscriptions WHERE ($1 = '' OR user_id = $1) AND ($2 = '' OR plan_id = $2) AND ($3 = '' OR status = $3)"
        " AND id > $4 ORDER BY id LIMIT $5",
        user, plan_id, status, after, limit,
    )


# ---- settlement ------------------------------------------------------------------------


async def due_plans(conn: Conn, until_us: int) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM plans WHERE settle_us <= $1 AND status <> 'settled' ORDER BY settle_us, plan_id", until_us)


async def fail_plan(conn: asyncpg.Connection, plan_id: str, reason: str) -> None:
    """The plan's settlement failed: plan and every subscription not settled are failed
    with the reason (retried by a later run)."""
    await conn.execute("UPDATE plans SET status = 'failed', failure_reason = $2, attempts = attempts + 1 WHERE plan_id = $1", plan_id, reason)
    await conn.execute(
        "UPDATE subscriptions SET status = 'failed', failure_reason = $2 WHERE plan_id = $1 AND status <> 'settled'", plan_id, reason
    )


async def fix_price(conn: asyncpg.Connection, plan_id: str, price: Decimal, ticks: int, records: list[tuple[int, bool, str, Decimal]]) -> None:
    """The settlement price and every subscription's settlement record, in one transaction."""
    await conn.execute(
        "UPDATE plans SET settlement_price = $2, twap_ticks = $3, status = 'settling', failure_reason = NULL, attempts = attempts + 1"
        " WHERE plan_id = $1",
        plan_id, price, ticks,
    )
    if records:
        await conn.execute(
            "UPDATE subscriptions s SET status = 'settling', failure_reason = NULL, settlement_price = $2, converted = r.c,"
            " payout_asset = r.a, payout_amount = r.p FROM unnest($3::bigint[], $4::boolean[], $5::text[], $6::numeric[]) AS r(i, c, a, p)"
            " WHERE s.id = r.i AND s.plan_id = $1",
            plan_id, price, [r[0] for r in records], [r[1] for r in records], [r[2] for r in records], [r[3] for r in records],
        )


async def to_pay(conn: Conn, plan_id: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM subscriptions WHERE plan_id = $1 AND status <> 'settled' AND payout_asset IS NOT NULL ORDER BY id", plan_id
    )


async def mark_settled(conn: Conn, subscription_id: int, at: datetime) -> bool:
    return bool(await conn.fetchval(
        "UPDATE subscriptions SET status = 'settled', failure_reason = NULL, settled_at = $2 WHERE id = $1 AND status <> 'settled' RETURNING true",
        subscription_id, at,
    ))


async def fail_subscription(conn: Conn, subscription_id: int, reason: str) -> None:
    await conn.execute("UPDATE subscriptions SET status = 'failed', failure_reason = $2 WHERE id = $1 AND status <> 'settled'", subscription_id, reason)


async def finish_plan(conn: Conn, plan_id: str, at: datetime) -> bool:
    """Settled once every subscription is."""
    return bool(await conn.fetchval(
        "UPDATE plans SET status = 'settled', failure_reason = NULL, settled_at = $2 WHERE plan_id = $1 AND status <> 'settled'"
        " AND NOT EXISTS (SELECT 1 FROM subscriptions WHERE plan_id = $1 AND status <> 'settled') RETURNING true",
        plan_id, at,
    ))


async def plan_settled_count(conn: Conn, plan_id: str) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM subscriptions WHERE plan_id = $1 AND status = 'settled'", plan_id))


async def paid(conn: Conn, plan_ids: list[str]) -> dict[str, Decimal]:
    rows = await conn.fetch(
        "SELECT payout_asset, sum(payout_amount) AS total FROM subscriptions WHERE plan_id = ANY($1::text[]) AND status = 'settled'"
        " GROUP BY payout_asset ORDER BY payout_asset",
        plan_ids,
    )
    return {r["payout_asset"]: r["total"] for r in rows}
