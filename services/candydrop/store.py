"""CandyDrop's SQL (asyncpg), schema ``candydrop``.

Counting and the distribution meet on the campaign's row: the consumer reads the
campaigns an event may count for ``FOR SHARE`` and only those still open
(``distribution IS NULL``); the distribution locks the row ``FOR UPDATE`` and marks it
'distributing' in the transaction that records the prizes. So an event either counted
before the prizes were computed (and is in them) or is not counted at all.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from services.candydrop import domain
from services.kernel import distribution

Conn = asyncpg.Connection | asyncpg.Pool

# Where the distribution pays from (services.kernel.distribution): campaigns by campaign_id, one row of prizes per user.
LEDGER = distribution.Ledger("campaigns", "campaign_id", "prizes", "prize_asset")


# ---- campaigns ----------------------------------------------------------------------


async def insert_campaign(conn: asyncpg.Connection, c: domain.Campaign, end_hour: int, at: datetime) -> bool:
    if not await conn.fetchval(
        "INSERT INTO campaigns (campaign_id, prize_asset, prize_pool, pool_kind, prize_per_candy, per_user_cap, start_at, end_at, end_hour, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING RETURNING true",
        c.campaign_id, c.prize_asset, c.pool, c.pool_kind.value, c.per_candy, c.cap, c.start, c.end, end_hour, at,
    ):
        return False
    await conn.executemany(
        "INSERT INTO tasks (campaign_id, task_id, position, kind, asset, threshold, candies, max_completions) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        [(c.campaign_id, t.task_id, i, t.kind.value, t.asset, t.threshold, t.candies, t.max_completions) for i, t in enumerate(c.tasks)],
    )
    return True


async def campaign(conn: Conn, campaign_id: str, *, lock: bool = False) -> asyncpg.Record:
    return await distribution.parent_row(conn, LEDGER, campaign_id, lock=lock)


def _task(r: asyncpg.Record) -> domain.Task:
    return domain.Task(r["task_id"], domain.TaskKind(r["kind"]), r["asset"], r["threshold"], r["candies"], r["max_completions"])


async def tasks_of(conn: Conn, campaign_ids: Sequence[str]) -> dict[str, list[domain.Task]]:
    out: dict[str, list[domain.Task]] = defaultdict(list)
    for r in await conn.fetch("SELECT * FROM tasks WHERE campaign_id = ANY($1::text[]) ORDER BY campaign_id, position", list(campaign_ids)):
        out[r["campaign_id"]].append(_task(r))
    return out


def as_campaign(row: asyncpg.Record, tasks: Sequence[domain.Task]) -> domain.Campaign:
    return domain.Campaign(
        row["campaign_id"], row["prize_asset"], row["prize_pool"], domain.PoolKind(row["pool_kind"]), row["prize_per_candy"],
        row["per_user_cap"], row["start_at"], row["end_at"], tuple(tasks),
    )


_STATUS_SQL = {
    domain.Status.UPCOMING: "distribution IS NULL AND start_at > $1",
    domain.Status.ACTIVE: "distribution IS NULL AND start_at <= $1 AND end_at > $1",
    domain.Status.ENDED: "distribution IS NULL AND end_at <= $1",
    domain.Status.DISTRIBUTING: "distribution = 'distributing' AND $1::timestamptz IS NOT NULL",
    domain.Status.DISTRIBUTED: "distribution = 'distributed' AND $1::timestamptz IS NOT NULL",
}


async def list_campaigns(conn: Conn, wanted: domain.Status | None, now: datetime, after: int, limit: int) -> list[asyncpg.Record]:
    where = _STATUS_SQL[wanted] if wanted else "$1::timestamptz IS NOT NULL"
    return list(await conn.fetch(f"SELECT * FROM campaigns WHERE {where} AND seq > $2 ORDER BY seq LIMIT $3", now, after, limit))


async def participants(conn: Conn, campaign_id: str) -> int:
    return await conn.fetchval("SELECT count(*) FROM registrations WHERE campaign_id = $1", campaign_id)


async def progress_rows(conn: Conn, campaign_id: str, user_id: str | None = None) -> list[asyncpg.Record]:
    if user_id is None:
        return list(await conn.fetch("SELECT user_id, task_id, amount FROM progress WHERE campaign_id = $1", campaign_id))
    return list(await conn.fetch("SELECT user_id, task_id, amount FROM progress WHERE campaign_id = $1 AND user_id = $2", campaign_id, user_id))


def candies_by_user(tasks: Sequence[domain.Task], rows: Sequence[asyncpg.Record]) -> dict[str, int]:
    by_user: dict[str, dict[str, Decimal]] = defaultdict(dict)
    for r in rows:
        by_user[r["user_id"]][r["task_id"]] = r["amount"]
    return {u: domain.user_candies(tasks, p) for u, p in by_user.items()}


# ---- registrations ------------------------------------------------------------------


async def register(conn: asyncpg.Connection, campaign_id: str, user_id: str, at: datetime) -> datetime:
    await conn.execute(
        "INSERT INTO registrations (campaign_id, user_id, registered_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING", campaign_id, user_id, at,
    )
    return await conn.fetchval("SELECT registered_at FROM registrations WHERE campaign_id = $1 AND user_id = $2", campaign_id, user_id)


async def registration(conn: Conn, campaign_id: str, user_id: str) -> datetime | None:
    return await conn.fetchval("SELECT registered_at FROM registrations WHERE campaign_id = $1 AND user_id = $2", campaign_id, user_id)


# ---- counting -----------------------------------------------------------------------


async def counted(conn: asyncpg.Connection, facts: Sequence[domain.Fact]) -> dict[tuple[str, str], tuple[Decimal, bool]]:
    """What ``facts`` (one user's) add to the progress of the open campaigns the user
    registered for: (campaign, task) -> (amount, is a first deposit). Reads the campaigns
    FOR SHARE, inside the caller's transaction, so a distribution cannot freeze them
    before this transaction ends."""
    if not facts:
        return {}
    user = facts[0].user_id
    kinds = sorted({f.kind.value for f in facts})
    rows = await conn.fetch(
        "SELECT c.campaign_id, c.start_at, c.end_at, r.registered_at, t.task_id, t.kind, t.asset, t.threshold, t.candies, t.max_completions"
        " FROM registrations r JOIN campaigns c USING (campaign_id) JOIN tasks t USING (campaign_id)"
        " WHERE r.user_id = $1 AND t.kind = ANY($2::text[]) AND c.distribution IS NULL"
        " ORDER BY c.campaign_id, t.task_id FOR SHARE OF c",
        user, kinds,
    )
    adds: dict[tuple[str, str], tuple[Decimal, bool]] = {}
    for r in rows:
        task = _task(r)
        for fact in facts:
            value = domain.counts(fact=fact, task=task, start=r["start_at"], end=r["end_at"], registered_at=r["registered_at"])
            if value > 0:
                key = (r["campaign_id"], r["task_id"])
                old, _ = adds.get(key, (Decimal(0), False))
                first = task.kind is domain.TaskKind.FIRST_DEPOSIT
                adds[key] = (max(old, value) if first else old + value, first)
    return adds


async def add_progress(conn: asyncpg.Connection, user: str, adds: dict[tuple[str, str], tuple[Decimal, bool]], at: datetime) -> None:
    """Write what :func:`counted` found, rows in key order."""
    keys = sorted(adds)
    sums = [k for k in keys if not adds[k][1]]
    firsts = [k for k in keys if adds[k][1]]
    if sums:
        await conn.execute(
            "INSERT INTO progress AS p (campaign_id, task_id, user_id, amount, events, updated_at)"
            " SELECT c, t, $3, a, 1, $4 FROM unnest($1::text[], $2::text[], $5::numeric[]) AS u(c, t, a)"
            " ON CONFLICT (campaign_id, task_id, user_id) DO UPDATE SET"
            " amount = p.amount + EXCLUDED.amount, events = p.events + 1, updated_at = EXCLUDED.updated_at",
            [k[0] for k in sums], [k[1] for k in sums], user, at, [adds[k][0] for k in sums],
        )
    if firsts:  # a first deposit completes once: progress 1, whatever else arrives
        await conn.execute(
            "INSERT INTO progress (campaign_id, task_id, user_id, amount, events, updated_at)"
            " SELECT c, t, $3, 1, 1, $4 FROM unnest($1::text[], $2::text[]) AS u(c, t) ON CONFLICT DO NOTHING",
            [k[0] for k in firsts], [k[1] for k in firsts], user, at,
        )


async def registered_users(conn: Conn, users: Sequence[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT r.user_id FROM registrations r JOIN campaigns c USING (campaign_id)"
        " WHERE r.user_id = ANY($1::text[]) AND c.distribution IS NULL",
        list(users),
    )
    return {r["user_id"] for r in rows}


# ---- distribution -------------------------------------------------------------------


async def due_campaigns(conn: Conn, boundary_hour: int, ended_by: datetime) -> list[str]:
    """Campaigns not paid yet that end at or before the boundary and by ``ended_by``."""
    rows = await conn.fetch(
        "SELECT campaign_id FROM campaigns WHERE end_hour <= $1 AND end_at <= $2 AND distribution IS DISTINCT FROM 'distributed'"
        " ORDER BY end_hour, campaign_id",
        boundary_hour, ended_by,
    )
    return [r["campaign_id"] for r in rows]


async def record_prizes(
    conn: asyncpg.Connection, campaign_id: str, prizes: dict[str, Decimal], candies: dict[str, int], chunk_size: int,
    job: str, period: str,
) -> None:
    users = sorted(u for u in prizes)
    await conn.execute(
        "INSERT INTO prizes (campaign_id, user_id, candies, amount, chunk) SELECT $1, u, c, a, k"
        " FROM unnest($2::text[], $3::bigint[], $4::numeric[], $5::integer[]) AS x(u, c, a, k)",
        campaign_id, users, [candies[u] for u in users], [prizes[u] for u in users], distribution.chunk_numbers(len(users), chunk_size),
    )
    await conn.execute(
        "UPDATE campaigns SET distribution = 'distributing', job = $2, period = $3, total_candies = $4, winners = $5, paid = $6"
        " WHERE campaign_id = $1",
        campaign_id, job, period, sum(candies.values()), sum(1 for a in prizes.values() if a > 0), sum(prizes.values(), Decimal(0)),
    )


async def prize_of(conn: Conn, campaign_id: str, user_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM prizes WHERE campaign_id = $1 AND user_id = $2", campaign_id, user_id)


async def list_prizes(conn: Conn, user_id: str, campaign_id: str, after: int, limit: int) -> list[asyncpg.Record]:
    clauses, args = ["p.id > $1"], [after]
    if user_id:
        args.append(user_id)
        clauses.append(f"p.user_id = ${len(args)}")
    if campaign_id:
        args.append(campaign_id)
        clauses.append(f"p.campaign_id = ${len(args)}")
    args.append(limit)
    return list(await conn.fetch(
        f"SELECT p.*, c.prize_asset FROM prizes p JOIN campaigns c USING (campaign_id) WHERE {' AND '.join(clauses)} ORDER BY p.id LIMIT ${len(args)}",
        *args,
    ))


def as_dict(row: asyncpg.Record) -> dict[str, Any]:
    return dict(row.items())
