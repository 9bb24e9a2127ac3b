"""HODLer Airdrop's SQL (asyncpg), schema ``hodler``.

Seeding and consumption meet on ``balances``: CreateAirdrop takes ``LOCK TABLE balances
IN SHARE MODE`` first in its transaction, so an event's transaction (which updates
balances, then reads the open airdrops of the asset) either committed before the seed
(its change is in the seeded PRE) or runs after the airdrop committed (and adds to its
sums): every change counts once. Consumption and the distribution meet on the airdrop's
row: the consumer reads the airdrops an event adds to ``FOR SHARE`` and only those still
open (``distribution IS NULL``); the distribution locks the row ``FOR UPDATE`` and marks
it 'distributing' in the transaction that records the rewards.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from fractions import Fraction

import asyncpg

from services.hodler import domain
from services.kernel import distribution

Conn = asyncpg.Connection | asyncpg.Pool

# Where the distribution pays from (services.kernel.distribution): airdrops by airdrop_id, one row of rewards per user.
LEDGER = distribution.Ledger("airdrops", "airdrop_id", "rewards", "reward_asset")

# The projected integral of a holdings row h of airdrop a: (e - s) x PRE + e x D1 - M1.
_INTEGRAL = "((a.end_us - a.start_us) * h.pre + a.end_us * h.d1 - h.m1)"


# ---- airdrops ---------------------------------------------------------------------------


async def insert_airdrop(conn: asyncpg.Connection, a: domain.Airdrop, at: datetime) -> bool:
    """The airdrop and its sums, PRE seeded from the counted balances of the hold asset.
    Call first in the transaction: it locks ``balances`` against concurrent events."""
    await conn.execute("LOCK TABLE balances IN SHARE MODE")
    if not await conn.fetchval(
        "INSERT INTO airdrops (airdrop_id, hold_asset, reward_asset, total, start_hour, end_hour, start_us, end_us, min_average,"
        " per_user_cap, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING RETURNING true",
        a.airdrop_id, a.hold_asset, a.reward_asset, a.total, a.start_hour, a.end_hour, a.start_us, a.end_us, a.min_average, a.cap, at,
    ):
        return False
    await conn.execute(
        "INSERT INTO holdings (airdrop_id, user_id, pre) SELECT $1, user_id, amount FROM balances WHERE asset = $2 AND amount <> 0",
        a.airdrop_id, a.hold_asset,
    )
    await conn.execute(
        "INSERT INTO airdrop_sums (airdrop_id, pre) SELECT $1, coalesce(sum(amount), 0) FROM balances WHERE asset = $2",
        a.airdrop_id, a.hold_asset,
    )
    return True


async def airdrop(conn: Conn, airdrop_id: str, *, lock: bool = False) -> asyncpg.Record:
    return await distribution.parent_row(conn, LEDGER, airdrop_id, lock=lock)


def as_airdrop(row: asyncpg.Record) -> domain.Airdrop:
    return domain.Airdrop(
        row["airdrop_id"], row["hold_asset"], row["reward_asset"], row["total"], row["start_hour"], row["end_hour"], row["min_average"],
        row["per_user_cap"],
    )


_STATUS_SQL = {
    domain.Status.UPCOMING: "distribution IS DISTINCT FROM 'distributed' AND start_us > $1",
    domain.Status.ACTIVE: "distribution IS DISTINCT FROM 'distributed' AND start_us <= $1 AND end_us > $1",
    domain.Status.ENDED: "distribution IS DISTINCT FROM 'distributed' AND end_us <= $1",
    domain.Status.DISTRIBUTED: "distribution = 'distributed' AND $1::bigint IS NOT NULL",
}


async def list_airdrops(conn: Conn, wanted: domain.Status | None, now_us: int, after: int, limit: int) -> list[asyncpg.Record]:
    where = _STATUS_SQL[wanted] if wanted else "$1::bigint IS NOT NULL"
    return list(await conn.fetch(f"SELECT * FROM airdrops WHERE {where} AND seq > $2 ORDER BY seq LIMIT $3", now_us, after, limit))


async def count_by_status(conn: Conn, now_us: int) -> dict[domain.Status, int]:
    return {s: await conn.fetchval(f"SELECT count(*) FROM airdrops WHERE {sql}", now_us) for s, sql in _STATUS_SQL.items()}


async def holders(conn: Conn, airdrop_id: str) -> int:
    """Users whose projected integral over the window is positive."""
    return await conn.fetchval(
        f"SELECT count(*) FROM holdings h JOIN airdrops a USING (airdrop_id) WHERE h.airdrop_id = $1 AND {_INTEGRAL} > 0", airdrop_id,
    )


def _sums(row: asyncpg.Record | None) -> domain.Sums:
    if row is None:
        return domain.Sums()
    return domain.Sums(Fraction(row["pre"]), Fraction(row["d1"]), Fraction(row["m1"]))


async def airdrop_sums(conn: Conn, airdrop_id: str) -> domain.Sums:
    return _sums(await conn.fetchrow("SELECT pre, d1, m1 FROM airdrop_sums WHERE airdrop_id = $1", airdrop_id))


async def user_sums(conn: Conn, airdrop_id: str, user_id: str) -> domain.Sums:
    return _sums(await conn.fetchrow("SELECT pre, d1, m1 FROM holdings WHERE airdrop_id = $1 AND user_id = $2", airdrop_id, user_id))


async def all_sums(conn: Conn, airdrop_id: str) -> dict[str, domain.Sums]:
    rows = await conn.fetch("SELECT user_id, pre, d1, m1 FROM holdings WHERE airdrop_id = $1", airdrop_id)
    return {r["user_id"]: _sums(r) for r in rows}


async def window_changes(conn: Conn, airdrop_id: str, user_id: str, from_us: int, to_us: int) -> tuple[Decimal, list[tuple[int, Decimal]]]:
    """The user's changes in the window before ``from_us`` (summed) and in [from_us, to_us)."""
    before = await conn.fetchval(
        "SELECT coalesce(sum(delta), 0) FROM window_changes WHERE airdrop_id = $1 AND user_id = $2 AND t_us < $3", airdrop_id, user_id, from_us,
    )
    rows = await conn.fetch(
        "SELECT t_us, delta FROM window_changes WHERE airdrop_id = $1 AND user_id = $2 AND t_us >= $3 AND t_us < $4 ORDER BY t_us",
        airdrop_id, user_id, from_us, to_us,
    )
    return before, [(r["t_us"], r["delta"]) for r in rows]


async def balance(conn: Conn, user_id: str, asset: str) -> Decimal:
    value = await conn.fetchval("SELECT amount FROM balances WHERE user_id = $1 AND asset = $2", user_id, asset)
    return Decimal(0) if value is None else value


# ---- events -----------------------------------------------------------------------------


async def apply_changes(conn: asyncpg.Connection, changes: dict[tuple[str, str], Decimal], t_us: int) -> int:
    """One posting's changes of counted holdings at time ``t_us``: the balances, then
    the sums of every open airdrop on the asset whose end is after ``t_us``. Set-based:
    one statement each, rows in key order. Returns how many airdrops the posting falls in
    but which are already being paid (a late posting: not counted, reported)."""
    keys = sorted(changes)
    users, assets, deltas = [k[0] for k in keys], [k[1] for k in keys], [changes[k] for k in keys]
    await conn.execute(
        "INSERT INTO balances AS b (user_id, asset, amount) SELECT * FROM unnest($1::text[], $2::text[], $3::numeric[])"
        " ON CONFLICT (user_id, asset) DO UPDATE SET amount = b.amount + EXCLUDED.amount",
        users, assets, deltas,
    )
    return await conn.fetchval(
        """
        WITH d AS (
            SELECT * FROM unnest($1::text[], $2::text[], $3::numeric[]) AS d(user_id, asset, delta)
        ), live AS (
            SELECT airdrop_id, hold_asset, start_us FROM airdrops
            WHERE hold_asset = ANY($2::text[]) AND end_us > $4::bigint AND distribution IS NULL
            ORDER BY airdrop_id FOR SHARE
        ), c AS (
            SELECT o.airdrop_id, d.user_id,
                   CASE WHEN $4::bigint < o.start_us THEN d.delta ELSE 0 END AS pre,
                   CASE WHEN $4::bigint >= o.start_us THEN d.delta ELSE 0 END AS d1,
                   CASE WHEN $4::bigint >= o.start_us THEN d.delta * $4::bigint ELSE 0 END AS m1
            FROM d JOIN live o ON o.hold_asset = d.asset
        ), h AS (
            INSERT INTO holdings AS h (airdrop_id, user_id, pre, d1, m1)
            SELECT airdrop_id, user_id, pre, d1, m1 FROM c ORDER BY airdrop_id, user_id
            ON CONFLICT (airdrop_id, user_id) DO UPDATE SET pre = h.pre + EXCLUDED.pre, d1 = h.d1 + EXCLUDED.d1, m1 = h.m1 + EXCLUDED.m1
        ), w AS (
            INSERT INTO window_changes (airdrop_id, user_id, t_us, delta)
            SELECT airdrop_id, user_id, $4::bigint, d1 FROM c WHERE d1 <> 0
        ), s AS (
            UPDATE airdrop_sums s SET pre = s.pre + t.pre, d1 = s.d1 + t.d1, m1 = s.m1 + t.m1
            FROM (SELECT airdrop_id, sum(pre) AS pre, sum(d1) AS d1, sum(m1) AS m1 FROM c GROUP BY airdrop_id) t
            WHERE s.airdrop_id = t.airdrop_id
        )
        SELECT count(*) FROM airdrops WHERE hold_asset = ANY($2::text[]) AND end_us > $4::bigint AND distribution IS NOT NULL
        """,
        users, assets, deltas, t_us,
    )


async def advance(conn: Conn, topic: str, offsets: dict[int, int]) -> None:
    """The next offsets to apply per partition (never backwards)."""
    parts = sorted(offsets)
    await conn.execute(
        'INSERT INTO consumed AS c (topic, "partition", next_offset) SELECT $1, p, o FROM unnest($2::int[], $3::bigint[]) AS x(p, o)'
        " ON CONFLICT (topic, \"partition\") DO UPDATE SET next_offset = GREATEST(c.next_offset, EXCLUDED.next_offset)",
        topic, parts, [offsets[p] for p in parts],
    )


async def consumed(conn: Conn, topic: str) -> dict[int, int]:
    rows = await conn.fetch('SELECT "partition", next_offset FROM consumed WHERE topic = $1', topic)
    return {r["partition"]: r["next_offset"] for r in rows}


# ---- distribution -----------------------------------------------------------------------


async def due_airdrops(conn: Conn, boundary_hour: int, settled_by_us: int) -> list[asyncpg.Record]:
    """Airdrops not paid yet that end at or before the boundary: those being paid, and
    those not started whose end is at or before ``settled_by_us`` (now less the settle
    delay, so that postings stamped before the end have reached the topic)."""
    return list(await conn.fetch(
        "SELECT airdrop_id, distribution FROM airdrops WHERE end_hour <= $1 AND distribution IS DISTINCT FROM 'distributed'"
        " AND (distribution IS NOT NULL OR end_us <= $2) ORDER BY end_hour, airdrop_id",
        boundary_hour, settled_by_us,
    ))


async def record_rewards(
    conn: asyncpg.Connection, airdrop_id: str, rewards: dict[str, Decimal], counted: dict[str, Decimal], chunk_size: int, job: str, period: str,
) -> None:
    users = sorted(counted)
    await conn.execute(
        "INSERT INTO rewards (airdrop_id, user_id, counted_average, amount, chunk) SELECT $1, u, c, a, k"
        " FROM unnest($2::text[], $3::numeric[], $4::numeric[], $5::integer[]) AS x(u, c, a, k)",
        airdrop_id, users, [counted[u] for u in users], [rewards.get(u, Decimal(0)) for u in users],
        distribution.chunk_numbers(len(users), chunk_size),
    )
    await conn.execute(
        "UPDATE airdrops SET distribution = 'distributing', job = $2, period = $3, winners = $4, paid = $5 WHERE airdrop_id = $1",
        airdrop_id, job, period, sum(1 for a in rewards.values() if a > 0), sum(rewards.values(), Decimal(0)),
    )


async def reward_of(conn: Conn, airdrop_id: str, user_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM rewards WHERE airdrop_id = $1 AND user_id = $2", airdrop_id, user_id)


async def list_rewards(conn: Conn, user_id: str, airdrop_id: str, after: int, limit: int) -> list[asyncpg.Record]:
    clauses, args = ["r.id > $1"], [after]
    if user_id:
        args.append(user_id)
        clauses.append(f"r.user_id = ${len(args)}")
    if airdrop_id:
        args.append(airdrop_id)
        clauses.append(f"r.airdrop_id = ${len(args)}")
    args.append(limit)
    return list(await conn.fetch(
        f"SELECT r.*, a.reward_asset FROM rewards r JOIN airdrops a USING (airdrop_id) WHERE {' AND '.join(clauses)} ORDER BY r.id LIMIT ${len(args)}",
        *args,
    ))

