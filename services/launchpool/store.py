"""Launchpool's SQL (asyncpg), schema ``launchpool``.

Stake writes take the SHARED form of the watermark advisory lock, then the pool's row
lock, and only then read the event time; CloseRewardHour takes the EXCLUSIVE form. So an
HourClosed tick follows every stake change of an earlier time in every partition, and a
pool's changes reach the engine in time order (they serialise on the pool's row).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from services.kernel import outbox
from services.kernel.clock import Clock
from services.kernel.errors import NotFound
from services.kernel.money import format_amount
from services.launchpool import domain

from earn.v1 import launchpool_pb2

PRODUCER = "launchpool"
TOPIC = "launchpool.accrual"
WATERMARK_LOCK = int.from_bytes(hashlib.sha256(b"launchpool:watermark").digest()[:8], "big", signed=True)

Conn = asyncpg.Connection | asyncpg.Pool


async def accrual_clock(conn: asyncpg.Connection, clock: Clock) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", WATERMARK_LOCK)


async def watermark_clock(conn: asyncpg.Connection, clock: Clock) -> datetime:
    await conn.execute("SELECT pg_advisory_xact_lock($1)", WATERMARK_LOCK)
    return clock.now()


# ---- projects and pools -------------------------------------------------------------

_POOL_COLUMNS = (
    "p.pool_id, p.project_id, p.position, p.stake_asset, p.total_reward, p.min_stake, p.max_stake, p.pool_cap, p.newcomer_only,"
    " p.cap_tiers, p.staked, p.stakers, j.reward_asset, j.start_hour, j.end_hour, j.payout_mode"
)


async def insert_project(conn: asyncpg.Connection, project_id: str, reward_asset: str, start_hour: int, end_hour: int,
                         mode: domain.PayoutMode, pools: Sequence[domain.PoolSpec], at: datetime) -> str | None:
    """Insert the project and its pools; None when done, else the id that exists already."""
    if not await conn.fetchval(
        "INSERT INTO projects (project_id, reward_asset, start_hour, end_hour, payout_mode, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING true",
        project_id, reward_asset, start_hour, end_hour, mode.value, at,
    ):
        return f"project_id: project {project_id} already exists"
    for i, p in enumerate(pools):
        tiers = json.dumps([{"min_volume": format_amount(t.min_volume), "max_stake": format_amount(t.max_stake)} for t in p.cap_tiers])
        if not await conn.fetchval(
            "INSERT INTO pools (pool_id, project_id, position, stake_asset, total_reward, min_stake, max_stake, pool_cap, newcomer_only, cap_tiers)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb) ON CONFLICT DO NOTHING RETURNING true",
            p.pool_id, project_id, i, p.stake_asset, p.total_reward, p.min_stake, p.max_stake, p.pool_cap, p.newcomer_only, tiers,
        ):
            return f"pools[{i}].pool_id: pool {p.pool_id} already exists"
    return None


async def project(conn: Conn, project_id: str) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM projects WHERE project_id = $1", project_id)
    if row is None:
        raise NotFound(f"project_id: no project {project_id}")
    return row


async def projects(conn: Conn) -> list[asyncpg.Record]:
    return list(await conn.fetch("SELECT * FROM projects ORDER BY start_hour, project_id"))


async def pools_of(conn: Conn, project_ids: Sequence[str]) -> list[asyncpg.Record]:
    return list(await conn.fetch(
        f"SELECT {_POOL_COLUMNS} FROM pools p JOIN projects j USING (project_id) WHERE p.project_id = ANY($1::text[]) ORDER BY p.project_id, p.position",
        list(project_ids),
    ))


async def pool(conn: Conn, pool_id: str, *, lock: bool = False) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"SELECT {_POOL_COLUMNS} FROM pools p JOIN projects j USING (project_id) WHERE p.pool_id = $1" + (" FOR UPDATE OF p" if lock else ""),
        pool_id,
    )
    if row is None:
        raise NotFound(f"pool_id: no pool {pool_id}")
    return row


def cap_tiers(row: asyncpg.Record) -> tuple[domain.CapTier, ...]:
    raw = row["cap_tiers"]
    data = json.loads(raw) if isinstance(raw, str) else raw
    return tuple(domain.CapTier(Decimal(t["min_volume"]), Decimal(t["max_stake"])) for t in data)


async def payout_pools(conn: Conn, boundary_hour: int) -> list[str]:
    """The pools a payout at ``boundary_hour`` pays (domain.pays_at), in id order."""
    rows = await conn.fetch(
        "SELECT p.pool_id, j.start_hour, j.end_hour, j.payout_mode FROM pools p JOIN projects j USING (project_id)"
        " WHERE j.start_hour < $1 AND $1 <= j.end_hour ORDER BY p.pool_id",
        boundary_hour,
    )
    return [r["pool_id"] for r in rows if domain.pays_at(domain.PayoutMode(r["payout_mode"]), r["start_hour"], r["end_hour"], boundary_hour)]


def pool_set_event(project_id: str, reward_asset: str, start_hour: int, end_hour: int, p: domain.PoolSpec) -> outbox.Outgoing:
    return outbox.Outgoing(TOPIC, p.pool_id, launchpool_pb2.LaunchpoolPoolSet(
        pool_id=p.pool_id, project_id=project_id, reward_asset=reward_asset, total_reward=format_amount(p.total_reward),
        start_hour=start_hour, end_hour=end_hour,
    ))


def stake_event(pool_id: str, stake_id: int, user_id: str, delta: Decimal, at_micros: int) -> outbox.Outgoing:
    return outbox.Outgoing(TOPIC, pool_id, launchpool_pb2.LaunchpoolStakeChanged(
        pool_id=pool_id, stake_id=str(stake_id), user_id=user_id, delta=format_amount(delta), at_micros=at_micros,
    ))


# ---- users ----------------------------------------------------------------------------


async def volume(conn: Conn, user_id: str) -> Decimal:
    value = await conn.fetchval("SELECT volume FROM volumes WHERE user_id = $1", user_id)
    return Decimal(0) if value is None else value


async def set_volume(conn: asyncpg.Connection, user_id: str, value: Decimal, at: datetime) -> None:
    await conn.execute(
        "INSERT INTO volumes (user_id, volume, updated_at) VALUES ($1, $2, $3)"
        " ON CONFLICT (user_id) DO UPDATE SET volume = EXCLUDED.volume, updated_at = EXCLUDED.updated_at",
        user_id, value, at,
    )


async def is_newcomer(conn: Conn, user_id: str, project_id: str) -> bool:
    return not await conn.fetchval(
        "SELECT true FROM stakes s JOIN pools p USING (pool_id) WHERE s.user_id = $1 AND p.project_id <> $2 LIMIT 1", user_id, project_id,
    )


# ---- stakes ----------------------------------------------------------------------------


async def stake_of(conn: Conn, user_id: str, pool_id: str, *, lock: bool = False) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM stakes WHERE user_id = $1 AND pool_id = $2" + (" FOR UPDATE" if lock else ""), user_id, pool_id,
    )


async def ensure_stake(conn: asyncpg.Connection, user_id: str, pool_id: str, at: datetime) -> asyncpg.Record:
    await conn.execute(
        "INSERT INTO stakes (user_id, pool_id, amount, created_at, updated_at) VALUES ($1, $2, 0, $3, $3) ON CONFLICT DO NOTHING",
        user_id, pool_id, at,
    )
    row = await stake_of(conn, user_id, pool_id, lock=True)
    assert row is not None
    return row


async def change_stake(conn: asyncpg.Connection, stake: asyncpg.Record, delta: Decimal, at: datetime, at_micros: int) -> int:
    """Apply ``delta`` to the stake and its pool (stakers counted); the change's id."""
    before: Decimal = stake["amount"]
    after = before + delta
    joined = (before == 0) - (after == 0)
    await conn.execute("UPDATE stakes SET amount = $2, updated_at = $3 WHERE id = $1", stake["id"], after, at)
    await conn.execute("UPDATE pools SET staked = staked + $2, stakers = stakers + $3 WHERE pool_id = $1", stake["pool_id"], delta, joined)
    return await conn.fetchval(
        "INSERT INTO stake_changes (stake_id, delta, at_micros, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
        stake["id"], delta, at_micros, at,
    )


async def stake_message(conn: Conn, row: asyncpg.Record, pool_row: asyncpg.Record | None = None) -> launchpool_pb2.LaunchpoolStake:
    p = pool_row if pool_row is not None else await pool(conn, row["pool_id"])
    paid = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM rewards WHERE stake_id = $1", row["id"])
    cap = domain.personal_cap(p["max_stake"], cap_tiers(p), await volume(conn, row["user_id"]))
    message = launchpool_pb2.LaunchpoolStake(
        stake_id=str(row["id"]), user_id=row["user_id"], pool_id=row["pool_id"], project_id=p["project_id"], stake_asset=p["stake_asset"],
        amount=format_amount(row["amount"]), reward_asset=p["reward_asset"], reward_paid=format_amount(paid), personal_cap=format_amount(cap),
    )
    message.updated_at.FromDatetime(row["updated_at"])
    return message


async def list_stakes(conn: Conn, user_id: str, project_id: str, after: int, limit: int) -> list[asyncpg.Record]:
    return list(await conn.fetch(
        "SELECT s.* FROM stakes s JOIN pools p USING (pool_id) WHERE ($1 = '' OR s.user_id = $1) AND ($2 = '' OR p.project_id = $2)"
        " AND s.id > $3 ORDER BY s.id LIMIT $4",
        user_id, project_id, after, limit,
    ))


async def list_rewards(conn: Conn, user_id: str, pool_id: str, after: int, limit: int) -> list[asyncpg.Record]:
    return list(await conn.fetch(
        "SELECT r.*, s.pool_id, j.reward_asset, o.period FROM rewards r JOIN stakes s ON s.id = r.stake_id"
        " JOIN pools p ON p.pool_id = s.pool_id JOIN projects j ON j.project_id = p.project_id JOIN payouts o ON o.id = r.payout_id"
        " JOIN payout_batches b ON b.id = r.batch_id"
        " WHERE ($1 = '' OR s.user_id = $1) AND ($2 = '' OR s.pool_id = $2) AND r.id > $3 AND b.posted_at IS NOT NULL ORDER BY r.id LIMIT $4",
        user_id, pool_id, after, limit,
    ))


# ---- holds and releases ----------------------------------------------------------------


async def hold_state(conn: Conn, hold_id: int) -> str | None:
    """'used', 'abandoned' or None (not claimed yet)."""
    if await conn.fetchval("SELECT true FROM stake_holds WHERE hold_id = $1", hold_id):
        return "used"
    if await conn.fetchval("SELECT true FROM abandoned_holds WHERE hold_id = $1", hold_id):
        return "abandoned"
    return None


def _hold_lock(hold_id: int) -> int:
    return int.from_bytes(hashlib.sha256(f"launchpool:hold:{hold_id}".encode()).digest()[:8], "big", signed=True)


async def claim_hold(conn: asyncpg.Connection, hold_id: int, stake_id: int, amount: Decimal, at: datetime) -> bool:
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _hold_lock(hold_id))
    if await conn.fetchval("SELECT true FROM abandoned_holds WHERE hold_id = $1", hold_id):
        return False
    await conn.execute(
        "INSERT INTO stake_holds (hold_id, stake_id, amount, remaining, created_at) VALUES ($1, $2, $3, $3, $4)", hold_id, stake_id, amount, at,
    )
    return True


async def abandon_hold(conn: asyncpg.Connection, hold_id: int, amount: Decimal, reason: str) -> bool:
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _hold_lock(hold_id))
    if await conn.fetchval("SELECT true FROM stake_holds WHERE hold_id = $1", hold_id):
        return False
    await conn.execute("INSERT INTO abandoned_holds (hold_id, reason) VALUES ($1, $2) ON CONFLICT DO NOTHING", hold_id, reason[:200])
    await schedule_release(conn, f"lp:abandon:{hold_id}", hold_id, amount, "abandoned")
    return True


async def holds_newest_first(conn: asyncpg.Connection, stake_id: int) -> list[tuple[int, Decimal]]:
    rows = await conn.fetch(
        "SELECT hold_id, remaining FROM stake_holds WHERE stake_id = $1 AND remaining > 0 ORDER BY hold_id DESC FOR UPDATE", stake_id,
    )
    return [(r["hold_id"], r["remaining"]) for r in rows]


async def reduce_hold(conn: asyncpg.Connection, hold_id: int, amount: Decimal) -> None:
    await conn.execute("UPDATE stake_holds SET remaining = remaining - $2 WHERE hold_id = $1", hold_id, amount)


async def schedule_release(conn: asyncpg.Connection, key: str, hold_id: int, amount: Decimal, reason: str) -> None:
    await conn.execute(
        "INSERT INTO wallet_releases (key, hold_id, amount, reason) VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO NOTHING",
        key, hold_id, amount, reason,
    )


async def pending_releases(conn: Conn) -> list[asyncpg.Record]:
    return list(await conn.fetch("SELECT id, key, hold_id, amount FROM wallet_releases WHERE NOT done ORDER BY id LIMIT 500"))


async def release_done(conn: Conn, release_id: int) -> None:
    await conn.execute("UPDATE wallet_releases SET done = true WHERE id = $1", release_id)


# ---- idempotency replay ---------------------------------------------------------------


# ---- watermark and payouts ------------------------------------------------------------


async def last_closed_hour(conn: Conn) -> int | None:
    return await conn.fetchval("SELECT hour FROM watermark WHERE id = 1")


async def set_last_closed_hour(conn: asyncpg.Connection, hour: int, at: datetime) -> None:
    await conn.execute(
        "INSERT INTO watermark (id, hour, closed_at) VALUES (1, $1, $2) ON CONFLICT (id) DO UPDATE SET hour = EXCLUDED.hour, closed_at = EXCLUDED.closed_at",
        hour, at,
    )


async def payout_request(conn: Conn, job: str, period: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM payouts WHERE job = $1 AND period = $2", job, period)


async def insert_payout_request(conn: asyncpg.Connection, job: str, period: str, boundary_hour: int, pool_ids: list[str], at: datetime) -> bool:
    return bool(await conn.fetchval(
        "INSERT INTO payouts (job, period, boundary_hour, pool_ids, requested_at) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (job, period) DO NOTHING RETURNING true",
        job, period, boundary_hour, pool_ids, at,
    ))


async def payout_status(conn: Conn, payout_id: int) -> tuple[int, int, dict[str, Decimal]]:
    done = await conn.fetchval(
        "SELECT count(*) FROM payout_batches WHERE payout_id = $1 AND last AND posted_at IS NOT NULL", payout_id,
    )
    rows = await conn.fetch(
        "SELECT asset, sum(items) AS items, sum(total) AS total FROM payout_batches WHERE payout_id = $1 AND posted_at IS NOT NULL AND items > 0 GROUP BY asset",
        payout_id,
    )
    return int(done), int(sum(r["items"] for r in rows)), {r["asset"]: r["total"] for r in rows}


async def batch(conn: Conn, payout_id: int, partition: int, sequence: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        'SELECT * FROM payout_batches WHERE payout_id = $1 AND "partition" = $2 AND sequence = $3', payout_id, partition, sequence,
    )


async def stakes_by_id(conn: Conn, ids: list[int]) -> dict[int, tuple[str, str]]:
    rows = await conn.fetch("SELECT id, user_id, pool_id FROM stakes WHERE id = ANY($1::bigint[])", ids)
    return {r["id"]: (r["user_id"], r["pool_id"]) for r in rows}


async def batch_credits(conn: Conn, batch_id: int) -> list[tuple[str, Decimal]]:
    rows = await conn.fetch(
        "SELECT s.user_id, r.amount FROM rewards r JOIN stakes s ON s.id = r.stake_id WHERE r.batch_id = $1 ORDER BY r.id", batch_id,
    )
    return [(r["user_id"], r["amount"]) for r in rows]


def record_fields(row: asyncpg.Record) -> dict[str, Any]:
    return dict(row)
