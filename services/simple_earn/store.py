"""Simple Earn persistence (asyncpg) and the events it publishes.

Functions taking a ``conn`` run inside the caller's transaction. Every transaction that
publishes to the accrual topic starts with :func:`accrual_clock`: it takes the SHARED
form of the watermark advisory lock and only then reads the commit/event time, while
CloseHour takes the EXCLUSIVE form. So an HourClosed tick is enqueued after every change
whose transaction started before it, and every later change has a later time: the tick
is a true watermark in each partition.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from services.kernel import outbox
from services.kernel.errors import NotFound
from services.kernel.clock import Clock
from services.kernel.interest import Tier
from services.kernel.money import format_amount
from services.simple_earn import domain
from services.simple_earn.domain import Cadence, Kind, Limits, PositionStatus, Status, Tiers

from earn.v1 import accrual_pb2, simple_earn_pb2

PRODUCER = "simple_earn"
TOPIC = "simple_earn.accrual"
# The job name of fixed-term interest records (paid at maturity, not by the engine).
MATURITY_JOB = "simple_earn.maturity"
WATERMARK_LOCK = int.from_bytes(hashlib.sha256(b"simple_earn:accrual-watermark").digest()[:8], "big", signed=True)


async def accrual_clock(conn: asyncpg.Connection, clock: Clock) -> datetime:
    """Shared watermark lock, then the event time (read after the lock)."""
    await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", WATERMARK_LOCK)
    return clock.now()


async def watermark_clock(conn: asyncpg.Connection, clock: Clock) -> datetime:
    """Exclusive watermark lock (CloseHour): waits for every accrual writer in flight."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", WATERMARK_LOCK)
    return clock.now()


# ---- tiers <-> json / proto ------------------------------------------------------------


def tiers_json(tiers: Tiers) -> str:
    return json.dumps([{"up_to": None if t.up_to is None else format_amount(t.up_to), "apr": format_amount(t.apr)} for t in tiers])


def tiers_from_json(text: str | None) -> Tiers:
    if not text:
        return ()
    return tuple(Tier(None if t["up_to"] is None else Decimal(t["up_to"]), Decimal(t["apr"])) for t in json.loads(text))


def tier_messages(tiers: Tiers) -> list[accrual_pb2.RateTier]:
    return [accrual_pb2.RateTier(up_to="" if t.up_to is None else format_amount(t.up_to), apr=format_amount(t.apr)) for t in tiers]


# ---- products ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Product:
    product_id: str
    asset: str
    kind: Kind
    status: Status
    tiers: Tiers
    limits: Limits
    subscribed: Decimal
    term_days: int
    early_redeem_allowed: bool
    cadence: Cadence
    created_at: datetime


_PRODUCT_COLUMNS = (
    "product_id, asset, kind, status, tiers::text AS tiers, min_subscription, max_per_user, quota, subscribed,"
    " term_days, early_redeem_allowed, payout_cadence, created_at"
)


def _product(row: asyncpg.Record) -> Product:
    return Product(
        product_id=row["product_id"],
        asset=row["asset"],
        kind=Kind(row["kind"]),
        status=Status(row["status"]),
        tiers=tiers_from_json(row["tiers"]),
        limits=Limits(row["min_subscription"], row["max_per_user"], row["quota"]),
        subscribed=row["subscribed"],
        term_days=row["term_days"],
        early_redeem_allowed=row["early_redeem_allowed"],
        cadence=Cadence(row["payout_cadence"]),
        created_at=row["created_at"],
    )


async def get_product(conn: asyncpg.Connection | asyncpg.Pool, product_id: str, *, lock: bool = False) -> Product:
    row = await conn.fetchrow(
        f"SELECT {_PRODUCT_COLUMNS} FROM products WHERE product_id = $1" + (" FOR UPDATE" if lock else ""), product_id
    )
    if row is None:
        raise NotFound(f"product_id: no product {product_id}")
    return _product(row)


async def subscribe_context(pool: asyncpg.Pool, product_id: str, user_id: str, key: str) -> tuple[Product, Decimal, asyncpg.Record]:
    """What a Subscribe reads before its wallet hold, in one statement: the product, the
    user's active total in it, and the client key's row (``request_hash`` and
    ``response``, None when the key is new)."""
    row = await pool.fetchrow(
        f"SELECT {_PRODUCT_COLUMNS},"
        " (SELECT coalesce(sum(principal), 0) FROM positions WHERE user_id = $2 AND product_id = $1 AND status = 'active') AS user_total,"
        " k.request_hash, k.response"
        " FROM products LEFT JOIN LATERAL (SELECT request_hash, response FROM idempotency_keys WHERE key = $3) AS k ON true"
        " WHERE product_id = $1",
        product_id, user_id, key,
    )
    if row is None:
        raise NotFound(f"product_id: no product {product_id}")
    return _product(row), row["user_total"], row


async def list_products(pool: asyncpg.Pool, asset: str) -> list[Product]:
    rows = await pool.fetch(f"SELECT {_PRODUCT_COLUMNS} FROM products WHERE ($1 = '' OR asset = $1) ORDER BY product_id", asset)
    return [_product(r) for r in rows]


async def insert_product(conn: asyncpg.Connection, p: Product) -> bool:
    """False when the product id exists."""
    return bool(
        await conn.fetchval(
            "INSERT INTO products (product_id, asset, kind, status, tiers, min_subscription, max_per_user, quota,"
            " term_days, early_redeem_allowed, payout_cadence, created_at, updated_at)"
            " VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12, $12)"
            " ON CONFLICT (product_id) DO NOTHING RETURNING true",
            p.product_id, p.asset, p.kind.value, p.status.value, tiers_json(p.tiers), p.limits.min_subscription,
            p.limits.max_per_user, p.limits.quota, p.term_days, p.early_redeem_allowed, p.cadence.value, p.created_at,
        )
    )


async def update_product(conn: asyncpg.Connection, product_id: str, status: Status, limits: Limits, at: datetime) -> None:
    await conn.execute(
        "UPDATE products SET status = $2, min_subscription = $3, max_per_user = $4, quota = $5, updated_at = $6 WHERE product_id = $1",
        product_id, status.value, limits.min_subscription, limits.max_per_user, limits.quota, at,
    )


async def set_rates(conn: asyncpg.Connection, product_id: str, tiers: Tiers, effective_hour: int, at: datetime) -> None:
    await conn.execute("UPDATE products SET tiers = $2::jsonb, updated_at = $3 WHERE product_id = $1", product_id, tiers_json(tiers), at)
    await conn.execute(
        "INSERT INTO rate_history (product_id, effective_hour, tiers, changed_at) VALUES ($1, $2, $3::jsonb, $4)",
        product_id, effective_hour, tiers_json(tiers), at,
    )


async def rate_history(conn: asyncpg.Connection | asyncpg.Pool, product_id: str) -> list[tuple[int, Tiers, datetime]]:
    rows = await conn.fetch(
        "SELECT effective_hour, tiers::text AS tiers, changed_at FROM rate_history WHERE product_id = $1 ORDER BY id", product_id
    )
    return [(r["effective_hour"], tiers_from_json(r["tiers"]), r["changed_at"]) for r in rows]


async def add_subscribed(conn: asyncpg.Connection, product_id: str, delta: Decimal) -> None:
    await conn.execute("UPDATE products SET subscribed = subscribed + $2 WHERE product_id = $1", product_id, delta)


def product_message(p: Product) -> simple_earn_pb2.Product:
    left = domain.left_quota(p.limits.quota, p.subscribed)
    msg = simple_earn_pb2.Product(
        product_id=p.product_id,
        asset=p.asset,
        kind=simple_earn_pb2.PRODUCT_KIND_FLEXIBLE if p.kind is Kind.FLEXIBLE else simple_earn_pb2.PRODUCT_KIND_FIXED,
        status=simple_earn_pb2.PRODUCT_STATUS_ACTIVE if p.status is Status.ACTIVE else simple_earn_pb2.PRODUCT_STATUS_PAUSED,
        tiers=tier_messages(p.tiers),
        min_subscription=format_amount(p.limits.min_subscription),
        max_per_user="" if p.limits.max_per_user is None else format_amount(p.limits.max_per_user),
        quota="" if p.limits.quota is None else format_amount(p.limits.quota),
        subscribed=format_amount(p.subscribed),
        left_quota="" if left is None else format_amount(left),
        term_days=p.term_days,
        early_redeem_allowed=p.early_redeem_allowed,
        payout_cadence=simple_earn_pb2.PAYOUT_CADENCE_DAILY if p.cadence is Cadence.DAILY else simple_earn_pb2.PAYOUT_CADENCE_HOURLY,
    )
    msg.created_at.FromDatetime(p.created_at)
    return msg


def rates_event(p: Product, tiers: Tiers, effective_hour: int) -> list[outbox.Outgoing]:
    return outbox.broadcast(
        TOPIC,
        f"product:{p.product_id}",
        accrual_pb2.ProductRatesSet(product_id=p.product_id, asset=p.asset, effective_hour=effective_hour, tiers=tier_messages(tiers)),
    )


# ---- positions -----------------------------------------------------------------------

# interest_paid is derived on read, the sum of the position's interest records
# (position_interest: its rows in interest_records and its items in the payout_items
# chunks whose range holds it), instead of an UPDATE per payout.
_POSITION_COLUMNS = (
    "id, user_id, product_id, asset, kind, principal, status, auto_subscribe, auto_renew, fixed_tiers::text AS fixed_tiers,"
    " accrues_from_hour, matures_hour, closed_from_hour, opened_at,"
    " (SELECT coalesce(sum(i.amount), 0) FROM position_interest(positions.id) i) AS interest_paid"
)


async def get_position(conn: asyncpg.Connection | asyncpg.Pool, position_id: int, user_id: str | None, *, lock: bool = False) -> asyncpg.Record:
    """A position; NOT_FOUND also when it belongs to another user than ``user_id`` (no
    existence leak across users)."""
    row = await conn.fetchrow(f"SELECT {_POSITION_COLUMNS} FROM positions WHERE id = $1" + (" FOR UPDATE" if lock else ""), position_id)
    return _owned(row, position_id, user_id)


def _owned(row: asyncpg.Record | None, position_id: int, user_id: str | None) -> asyncpg.Record:
    if row is None or (user_id is not None and row["user_id"] != user_id):
        raise NotFound(f"position_id: no position {position_id} of user {user_id}" if user_id else f"position_id: no position {position_id}")
    return row


async def redeem_context(pool: asyncpg.Pool, position_id: int, user_id: str, key: str) -> asyncpg.Record:
    """What a Redeem reads before its work, in one statement: the position (as
    ``get_position``) with the client key's ``request_hash`` and ``response`` (None when
    the key is new)."""
    row = await pool.fetchrow(
        f"SELECT {_POSITION_COLUMNS}, k.request_hash, k.response FROM positions"
        " LEFT JOIN LATERAL (SELECT request_hash, response FROM idempotency_keys WHERE key = $2) AS k ON true WHERE id = $1",
        position_id, key,
    )
    return _owned(row, position_id, user_id)


async def insert_position(
    conn: asyncpg.Connection,
    *,
    user_id: str,
    product: Product,
    auto_subscribe: bool,
    auto_renew: bool,
    fixed_tiers: Tiers | None,
    accrues_from_hour: int,
    matures_hour: int | None,
    at: datetime,
    renewed_from: int | None = None,
) -> int:
    position_id = await conn.fetchval(
        "INSERT INTO positions (user_id, product_id, asset, kind, principal, status, auto_subscribe, auto_renew, fixed_tiers,"
        " accrues_from_hour, matures_hour, renewed_from, opened_at, updated_at)"
        " VALUES ($1, $2, $3, $4, 0, 'active', $5, $6, $7::jsonb, $8, $9, $10, $11, $11) RETURNING id",
        user_id, product.product_id, product.asset, product.kind.value, auto_subscribe, auto_renew,
        None if fixed_tiers is None else tiers_json(fixed_tiers), accrues_from_hour, matures_hour, renewed_from, at,
    )
    await conn.execute("UPDATE products SET open_positions = open_positions + 1 WHERE product_id = $1", product.product_id)
    return position_id


async def add_principal(conn: asyncpg.Connection, position_id: int, product_id: str, amount: Decimal, effective_hour: int, at: datetime) -> None:
    """Principal +amount (or -amount), its change row, and the product's subscribed total."""
    await conn.execute(  # one statement: the three writes in one round trip
        "WITH pos AS (UPDATE positions SET principal = principal + $3, updated_at = $4 WHERE id = $1),"
        " product AS (UPDATE products SET subscribed = subscribed + $3 WHERE product_id = $5)"
        " INSERT INTO principal_changes (position_id, effective_hour, delta, created_at) VALUES ($1, $2, $3, $4)",
        position_id, effective_hour, amount, at, product_id,
    )


async def principal_changes(conn: asyncpg.Connection | asyncpg.Pool, position_id: int) -> list[tuple[int, Decimal]]:
    rows = await conn.fetch("SELECT effective_hour, delta FROM principal_changes WHERE position_id = $1 ORDER BY id", position_id)
    return [(r["effective_hour"], r["delta"]) for r in rows]


async def set_auto_subscribe(conn: asyncpg.Connection, position_id: int, enabled: bool, at: datetime) -> None:
    await conn.execute("UPDATE positions SET auto_subscribe = $2, updated_at = $3 WHERE id = $1", position_id, enabled, at)


async def close_position(conn: asyncpg.Connection, position_id: int, status: PositionStatus, closed_from_hour: int | None, at: datetime) -> None:
    product_id = await conn.fetchval(
        "UPDATE positions SET status = $2, closed_from_hour = $3, updated_at = $4 WHERE id = $1 AND status = 'active' RETURNING product_id",
        position_id, status.value, closed_from_hour, at,
    )
    if product_id is not None:
        await conn.execute("UPDATE products SET open_positions = open_positions - 1 WHERE product_id = $1", product_id)


async def open_positions(pool: asyncpg.Pool) -> list[tuple[str, int]]:
    """Open positions per product (a column kept by the writes: one read of products)."""
    rows = await pool.fetch("SELECT product_id, open_positions FROM products ORDER BY product_id")
    return [(r["product_id"], r["open_positions"]) for r in rows]


def position_message(row: asyncpg.Record) -> simple_earn_pb2.Position:
    status = {
        "active": simple_earn_pb2.POSITION_STATUS_ACTIVE,
        "matured": simple_earn_pb2.POSITION_STATUS_MATURED,
        "redeemed": simple_earn_pb2.POSITION_STATUS_REDEEMED,
    }[row["status"]]
    msg = simple_earn_pb2.Position(
        position_id=str(row["id"]),
        user_id=row["user_id"],
        product_id=row["product_id"],
        asset=row["asset"],
        principal=format_amount(row["principal"]),
        status=status,
        auto_subscribe=row["auto_subscribe"],
        auto_renew=row["auto_renew"],
        fixed_tiers=tier_messages(tiers_from_json(row["fixed_tiers"])),
        interest_paid=format_amount(row["interest_paid"]),
    )
    if row["matures_hour"] is not None:
        msg.matures_at.FromDatetime(domain.hour_start(row["matures_hour"]))
    msg.opened_at.FromDatetime(row["opened_at"])
    return msg


def position_changed(row: asyncpg.Record, changes: list[tuple[int, Decimal]], closed_from_hour: int = 0) -> outbox.Outgoing:
    return outbox.Outgoing(
        TOPIC,
        str(row["id"]),
        accrual_pb2.PositionChanged(
            position_id=str(row["id"]),
            product_id=row["product_id"],
            user_id=row["user_id"],
            asset=row["asset"],
            changes=[accrual_pb2.PrincipalChange(effective_hour=h, delta=format_amount(d)) for h, d in changes],
            closed_from_hour=closed_from_hour,
        ),
    )


# ---- holds ---------------------------------------------------------------------------


async def claim_hold(conn: asyncpg.Connection, hold_id: int, position_id: int, amount: Decimal, at: datetime) -> bool:
    """Attach a wallet hold to a position. False when the hold was abandoned meanwhile."""
    # Serialise with abandon_hold on the same hold id.
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _hold_lock(hold_id))
    if await conn.fetchval("SELECT true FROM abandoned_holds WHERE hold_id = $1", hold_id):
        return False
    await conn.execute(
        "INSERT INTO position_holds (hold_id, position_id, amount, remaining, created_at) VALUES ($1, $2, $3, $3, $4)",
        hold_id, position_id, amount, at,
    )
    return True


async def abandon_hold(conn: asyncpg.Connection, hold_id: int, amount: Decimal, reason: str) -> bool:
    """Mark a hold as carrying no position and schedule its release (in the caller's
    transaction). False when it carries a position: then it must not be released."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _hold_lock(hold_id))
    if await conn.fetchval("SELECT true FROM position_holds WHERE hold_id = $1", hold_id):
        return False
    await conn.execute("INSERT INTO abandoned_holds (hold_id, reason) VALUES ($1, $2) ON CONFLICT DO NOTHING", hold_id, reason[:200])
    await schedule_release(conn, f"se:abandon:{hold_id}", hold_id, amount, "abandoned")
    return True


# ---- a batch of Subscribes (group commit) ----------------------------------------------


async def user_totals(conn: asyncpg.Connection, product_id: str, user_ids: list[str]) -> dict[str, Decimal]:
    """Each user's active principal in the product, in one statement (users with none are left out)."""
    rows = await conn.fetch(
        "SELECT user_id, sum(principal) AS total FROM positions WHERE user_id = ANY($1::text[]) AND product_id = $2 AND status = 'active'"
        " GROUP BY user_id",
        user_ids, product_id,
    )
    return {r["user_id"]: r["total"] for r in rows}


async def open_flexible_positions(conn: asyncpg.Connection, product_id: str, user_ids: list[str]) -> dict[str, asyncpg.Record]:
    """The users' open flexible positions in the product (one each at most), locked in id order, by user."""
    rows = await conn.fetch(
        f"SELECT {_POSITION_COLUMNS} FROM positions WHERE user_id = ANY($1::text[]) AND product_id = $2 AND kind = 'flexible'"
        " AND status = 'active' ORDER BY id FOR UPDATE",
        user_ids, product_id,
    )
    return {r["user_id"]: r for r in rows}


async def lock_holds(conn: asyncpg.Connection, hold_ids: list[int]) -> set[int]:
    """``claim_hold``'s lock on several holds (in lock order, as one statement), then
    those of them abandoned meanwhile: the rest may be claimed in this transaction."""
    if not hold_ids:
        return set()
    await conn.execute(
        "SELECT pg_advisory_xact_lock(l) FROM (SELECT DISTINCT unnest($1::bigint[]) AS l ORDER BY 1) AS locks",
        [_hold_lock(h) for h in hold_ids],
    )
    rows = await conn.fetch("SELECT hold_id FROM abandoned_holds WHERE hold_id = ANY($1::bigint[])", hold_ids)
    return {r["hold_id"] for r in rows}


async def new_position_ids(conn: asyncpg.Connection, count: int) -> list[int]:
    if count == 0:
        return []
    return await conn.fetchval(
        "SELECT array_agg(nextval(pg_get_serial_sequence('positions', 'id'))) FROM generate_series(1, $1)", count
    )


@dataclass(frozen=True, slots=True)
class SubscriptionRows:
    """The writes of a batch of Subscribes of one product, in columns."""

    new_ids: list[int]  # new positions: id, owner, first principal and flags
    new_users: list[str]
    new_principals: list[Decimal]
    new_auto_subscribe: list[bool]
    new_auto_renew: list[bool]
    grown_ids: list[int]  # open positions: principal added and auto-subscribe asked
    grown_deltas: list[Decimal]
    grown_auto_subscribe: list[bool]
    position_ids: list[int]  # per subscription: its position, user, amount and claimed hold
    user_ids: list[str]
    amounts: list[Decimal]
    hold_ids: list[int]


async def record_subscriptions(
    conn: asyncpg.Connection, product: Product, rows: SubscriptionRows, accrues_from_hour: int, matures_hour: int | None, at: datetime
) -> dict[int, int]:
    """A batch's positions, principal changes, claimed holds, user subscriptions and the
    product's totals, in one statement (the holds locked by ``lock_holds`` and not
    abandoned, the product row locked). Returns the subscription id per hold id."""
    fixed_tiers = tiers_json(product.tiers) if product.kind is Kind.FIXED else None
    found = await conn.fetch(
        "WITH new_positions AS ("
        "  INSERT INTO positions (id, user_id, product_id, asset, kind, principal, status, auto_subscribe, auto_renew, fixed_tiers,"
        "   accrues_from_hour, matures_hour, opened_at, updated_at)"
        "  SELECT u.id, u.user_id, $1, $2, $3, u.principal, 'active', u.auto_subscribe, u.auto_renew, $4::jsonb, $5, $6, $7, $7"
        "  FROM unnest($8::bigint[], $9::text[], $10::numeric[], $11::bool[], $12::bool[]) AS u(id, user_id, principal, auto_subscribe, auto_renew)),"
        " grown AS ("
        "  UPDATE positions AS p SET principal = p.principal + u.delta, auto_subscribe = p.auto_subscribe OR u.auto_subscribe, updated_at = $7"
        "  FROM unnest($13::bigint[], $14::numeric[], $15::bool[]) AS u(id, delta, auto_subscribe) WHERE p.id = u.id),"
        " product AS ("
        "  UPDATE products SET subscribed = subscribed + (SELECT sum(a) FROM unnest($18::numeric[]) AS a),"
        "   open_positions = open_positions + cardinality($8::bigint[]) WHERE product_id = $1),"
        " items AS (SELECT * FROM unnest($16::bigint[], $17::text[], $18::numeric[], $19::bigint[]) WITH ORDINALITY AS u(position_id, user_id, amount, hold_id, n)),"
        " changes AS ("
        "  INSERT INTO principal_changes (position_id, effective_hour, delta, created_at) SELECT position_id, $5, amount, $7 FROM items ORDER BY n),"
        " claims AS ("
        "  INSERT INTO position_holds (hold_id, position_id, amount, remaining, created_at) SELECT hold_id, position_id, amount, amount, $7 FROM items)"
        " INSERT INTO subscriptions (position_id, user_id, product_id, amount, source, hold_id, created_at)"
        " SELECT position_id, user_id, $1, amount, 'user', hold_id, $7 FROM items ORDER BY n RETURNING id, hold_id",
        product.product_id, product.asset, product.kind.value, fixed_tiers, accrues_from_hour, matures_hour, at,
        rows.new_ids, rows.new_users, rows.new_principals, rows.new_auto_subscribe, rows.new_auto_renew,
        rows.grown_ids, rows.grown_deltas, rows.grown_auto_subscribe,
        rows.position_ids, rows.user_ids, rows.amounts, rows.hold_ids,
    )
    return {r["hold_id"]: r["id"] for r in found}


def new_position_row(
    position_id: int, user_id: str, product: Product, accrues_from_hour: int, matures_hour: int | None, at: datetime
) -> dict[str, object]:
    """A position a batch opens, with the columns ``position_message`` and
    ``position_changed`` read (principal 0 and no flags: the batch sets them)."""
    return {
        "id": position_id, "user_id": user_id, "product_id": product.product_id, "asset": product.asset, "kind": product.kind.value,
        "principal": Decimal(0), "status": PositionStatus.ACTIVE.value, "auto_subscribe": False, "auto_renew": False,
        "fixed_tiers": tiers_json(product.tiers) if product.kind is Kind.FIXED else None,
        "accrues_from_hour": accrues_from_hour, "matures_hour": matures_hour, "closed_from_hour": None, "opened_at": at,
        "interest_paid": Decimal(0),
    }


def _hold_lock(hold_id: int) -> int:
    return int.from_bytes(hashlib.sha256(f"simple_earn:hold:{hold_id}".encode()).digest()[:8], "big", signed=True)


async def holds_newest_first(conn: asyncpg.Connection, position_id: int) -> list[tuple[int, Decimal]]:
    rows = await conn.fetch(
        "SELECT hold_id, remaining FROM position_holds WHERE position_id = $1 AND remaining > 0 ORDER BY created_at DESC, hold_id DESC FOR UPDATE",
        position_id,
    )
    return [(r["hold_id"], r["remaining"]) for r in rows]


async def move_holds(conn: asyncpg.Connection, from_position: int, to_position: int) -> None:
    await conn.execute("UPDATE position_holds SET position_id = $2 WHERE position_id = $1 AND remaining > 0", from_position, to_position)


async def reduce_hold(conn: asyncpg.Connection, hold_id: int, amount: Decimal) -> None:
    await conn.execute("UPDATE position_holds SET remaining = remaining - $2 WHERE hold_id = $1", hold_id, amount)


async def schedule_release(conn: asyncpg.Connection, key: str, hold_id: int, amount: Decimal, reason: str) -> None:
    await conn.execute(
        "INSERT INTO wallet_releases (key, hold_id, amount, reason) VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO NOTHING",
        key, hold_id, amount, reason,
    )


async def pending_releases(pool: asyncpg.Pool, limit: int = 100, *, keys: list[str] | None = None, prefix: str | None = None) -> list[asyncpg.Record]:
    """Releases committed and not yet confirmed by the wallet (few: the partial index
    ``wallet_releases_pending``): the oldest ``limit``, those of ``keys``, or those whose
    key starts with ``prefix`` (one redemption's)."""
    if keys is not None:
        return await pool.fetch(
            "SELECT id, key, hold_id, amount FROM wallet_releases WHERE done_at IS NULL AND key = ANY($1::text[]) ORDER BY id", keys
        )
    if prefix is not None:
        return await pool.fetch(
            "SELECT id, key, hold_id, amount FROM wallet_releases WHERE done_at IS NULL AND starts_with(key, $1) ORDER BY id", prefix
        )
    return await pool.fetch("SELECT id, key, hold_id, amount FROM wallet_releases WHERE done_at IS NULL ORDER BY id LIMIT $1", limit)


async def release_done(pool: asyncpg.Pool, release_id: int) -> None:
    await pool.execute("UPDATE wallet_releases SET done_at = clock_timestamp() WHERE id = $1 AND done_at IS NULL", release_id)


# ---- records -------------------------------------------------------------------------


async def insert_subscription(
    conn: asyncpg.Connection, position: asyncpg.Record | int, user_id: str, product_id: str, amount: Decimal, source: str, hold_id: int, at: datetime
) -> int:
    position_id = position if isinstance(position, int) else position["id"]
    return await conn.fetchval(
        "INSERT INTO subscriptions (position_id, user_id, product_id, amount, source, hold_id, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        position_id, user_id, product_id, amount, source, hold_id, at,
    )


async def insert_redemption(
    conn: asyncpg.Connection, position: asyncpg.Record, amount: Decimal, source: str, interest_forfeited: bool, at: datetime
) -> int:
    return await conn.fetchval(
        "INSERT INTO redemptions (position_id, user_id, product_id, amount, source, interest_forfeited, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        position["id"], position["user_id"], position["product_id"], amount, source, interest_forfeited, at,
    )


async def payout_id(conn: asyncpg.Connection | asyncpg.Pool, job: str, period: str) -> int:
    """The id of payout (job, period), created on first use (interest records carry it)."""
    found = await conn.fetchval("SELECT id FROM payouts WHERE job = $1 AND period = $2", job, period)
    if found is None:
        await conn.execute("INSERT INTO payouts (job, period) VALUES ($1, $2) ON CONFLICT DO NOTHING", job, period)
        found = await conn.fetchval("SELECT id FROM payouts WHERE job = $1 AND period = $2", job, period)
    return found


async def insert_maturity_interest(
    conn: asyncpg.Connection, *, position_id: int, amount: Decimal, from_hour: int, to_hour: int, reinvested: bool, at: datetime
) -> bool:
    """The interest record of a fixed-term position at maturity (one per position: the
    maturity is one payout). False when recorded before."""
    return bool(
        await conn.fetchval(
            "INSERT INTO interest_records (payout_id, position_id, amount, from_hour, to_hour, reinvested, created_at)"
            " SELECT p.id, $2, $3, $4, $5, $6, $7 FROM payouts p WHERE p.job = $1 AND p.period = ''"
            " ON CONFLICT (position_id, payout_id) DO NOTHING RETURNING true",
            MATURITY_JOB, position_id, amount, from_hour, to_hour, reinvested, at,
        )
    )


def _time_clause(column: str, first: int) -> str:
    return f" AND (${first}::timestamptz IS NULL OR {column} >= ${first}) AND (${first + 1}::timestamptz IS NULL OR {column} < ${first + 1})"


async def list_positions(pool: asyncpg.Pool, user_id: str, product_id: str, after_id: int, limit: int) -> list[asyncpg.Record]:
    return await pool.fetch(
        f"SELECT {_POSITION_COLUMNS} FROM positions WHERE id > $1 AND ($2 = '' OR user_id = $2) AND ($3 = '' OR product_id = $3) ORDER BY id LIMIT $4",
        after_id, user_id, product_id, limit,
    )


async def list_records(
    pool: asyncpg.Pool, table: str, user_id: str, time_from: datetime | None, time_to: datetime | None, after_id: int, limit: int
) -> list[asyncpg.Record]:
    assert table in ("subscriptions", "redemptions")
    return await pool.fetch(
        f"SELECT * FROM {table} WHERE id > $1 AND ($2 = '' OR user_id = $2)" + _time_clause("created_at", 3) + " ORDER BY id LIMIT $5",
        after_id, user_id, time_from, time_to, limit,
    )


# A record's id: block * BLOCK + its index in the chunk (migration 0005).
BLOCK = 16384


async def list_interest(
    pool: asyncpg.Pool, user_id: str, position_id: int | None, time_from: datetime | None, time_to: datetime | None, after_id: int, limit: int
) -> tuple[list[asyncpg.Record], int | None]:
    """Interest records by id after ``after_id`` (at most ``limit``), with the position's
    product and asset and the payout's period (a maturity's period is its position id).
    The second value is where to go on when a page stopped short (always None now: a
    page is filled when there are records).

    With a user or a position, the records are those of the user's positions
    (positions_user) through position_interest, never a scan. Without either, both tables
    are read in id order (interest_records by its id, payout_items by block, at most
    ``limit`` chunks) and merged."""
    head = (
        "SELECT i.id, i.position_id, p.product_id, p.asset, i.amount, i.from_hour, i.to_hour, i.reinvested, i.created_at,"
        " CASE WHEN o.job = $1 THEN i.position_id::text ELSE o.period END AS period"
    )
    args: list[object] = [MATURITY_JOB, after_id]

    def filters(clauses: tuple[tuple[str, object], ...]) -> str:
        sql = ""
        for clause, value in clauses:
            if value is not None:
                args.append(value)
                sql += " AND " + clause.format(len(args))
        return sql

    if user_id or position_id is not None:
        sql = (
            head + " FROM positions p CROSS JOIN LATERAL (SELECT p.id AS position_id, x.* FROM position_interest(p.id) x) i"
            " JOIN payouts o ON o.id = i.payout_id WHERE i.id > $2"
        )
        sql += filters((("p.user_id = ${}", user_id or None), ("p.id = ${}", position_id), ("i.created_at >= ${}", time_from), ("i.created_at < ${}", time_to)))
        args.append(limit)
        return await pool.fetch(sql + f" ORDER BY i.id LIMIT ${len(args)}", *args), None
    times = filters((("i.created_at >= ${}", time_from), ("i.created_at < ${}", time_to)))
    args.append(limit)
    n = f"${len(args)}"
    rows = await pool.fetch(
        head + " FROM interest_records i JOIN positions p ON p.id = i.position_id JOIN payouts o ON o.id = i.payout_id"
        f" WHERE i.id > $2{times} ORDER BY i.id LIMIT {n}",
        *args,
    )
    items = await pool.fetch(
        head + " FROM (SELECT b.* FROM payout_items b"
        # chunks holding a record after $2, so each gives at least one
        f"  WHERE b.block >= $2::bigint / {BLOCK} AND b.block * {BLOCK} + cardinality(b.position_ids) - 1 > $2"
        f"  {times.replace('i.created_at', 'b.created_at')} ORDER BY b.block LIMIT {n}) b"
        f" CROSS JOIN LATERAL (SELECT b.block * {BLOCK} + u.k - 1 AS id, u.position_id, b.payout_id, u.amount, u.from_hour, b.to_hour,"
        "   EXISTS (SELECT 1 FROM payout_reinvestments x WHERE x.position_id = u.position_id AND x.payout_id = b.payout_id) AS reinvested,"
        "   b.created_at FROM unnest(b.position_ids, b.amounts, b.from_hours) WITH ORDINALITY AS u(position_id, amount, from_hour, k)) i"
        f" JOIN positions p ON p.id = i.position_id JOIN payouts o ON o.id = i.payout_id WHERE i.id > $2 ORDER BY i.id LIMIT {n}",
        *args,
    )
    return sorted([*rows, *items], key=lambda r: r["id"])[:limit], None


# ---- watermark and payouts ------------------------------------------------------------


async def last_closed_hour(conn: asyncpg.Connection) -> int | None:
    return await conn.fetchval("SELECT last_hour FROM closed_hours WHERE id = 1")


async def set_last_closed_hour(conn: asyncpg.Connection, hour: int, at: datetime) -> None:
    await conn.execute(
        "INSERT INTO closed_hours (id, last_hour, updated_at) VALUES (1, $1, $2)"
        " ON CONFLICT (id) DO UPDATE SET last_hour = EXCLUDED.last_hour, updated_at = EXCLUDED.updated_at",
        hour, at,
    )


async def payout_request(conn: asyncpg.Connection | asyncpg.Pool, job: str, period: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM payout_requests WHERE job = $1 AND period = $2", job, period)


async def insert_payout_request(
    conn: asyncpg.Connection, job: str, period: str, boundary_hour: int, cadence: Cadence, product_ids: list[str], at: datetime
) -> bool:
    return bool(
        await conn.fetchval(
            "INSERT INTO payout_requests (job, period, boundary_hour, cadence, product_ids, created_at) VALUES ($1, $2, $3, $4, $5, $6)"
            " ON CONFLICT DO NOTHING RETURNING true",
            job, period, boundary_hour, cadence.value, product_ids, at,
        )
    )


async def flexible_products(conn: asyncpg.Connection, cadence: Cadence) -> list[str]:
    rows = await conn.fetch("SELECT product_id FROM products WHERE kind = 'flexible' AND payout_cadence = $1 ORDER BY product_id", cadence.value)
    return [r["product_id"] for r in rows]


# ---- payout batches ------------------------------------------------------------------------
#
# A batch is recorded in ONE transaction (record_payout_batch) before the wallet is
# called: the items are checked against positions (CHECK_ITEMS), then, under the payout's
# lock, their interest records inserted, what was left out and why, the reinvestment
# decision, the event id (inbox) and the batch row with its totals (RECORD_BATCH). The
# wallet credit follows with a key derived from the batch; post_payout_batch then marks
# the batch posted (and its partition done when it is the last). A redelivery finds the
# batch row: posted -> nothing to do; not yet posted -> the same credit again (the wallet
# answers it from its idempotency key), computed from the row, never anew.


@dataclass(frozen=True, slots=True)
class RecordedBatch:
    items: int  # items recorded, to be paid by the batch's one wallet credit
    paid: Decimal  # their sum
    excluded: frozenset[int]  # indexes (into the batch's columns) of the items left out
    problems: str | None  # why they were left out, one line per item
    reinvest: tuple[int, ...]  # positions whose interest is reinvested, decided here
    digest: bytes  # of the batch as first delivered
    posted: bool  # the wallet confirmed the credit


def _recorded(row: asyncpg.Record) -> RecordedBatch:
    return RecordedBatch(
        items=row["items"],
        paid=row["paid"],
        excluded=frozenset(row["excluded"]),
        problems=row["problems"],
        reinvest=tuple(row["reinvest"]),
        digest=bytes(row["digest"] or b""),
        posted=row["posted_at"] is not None,
    )


async def payout_batch(conn: asyncpg.Connection | asyncpg.Pool, job: str, period: str, partition: int, sequence: int) -> RecordedBatch | None:
    row = await conn.fetchrow(
        "SELECT items, paid, excluded, problems, reinvest, digest, posted_at FROM payout_batches"
        " WHERE job = $1 AND period = $2 AND partition = $3 AND sequence = $4",
        job, period, partition, sequence,
    )
    return None if row is None else _recorded(row)


# The first of the two statements of a batch, before the payout's lock: the items checked
# against positions. $1 position ids and $2 user ids (each one text of lines, the
# items sent), $3 product, $4 asset. Returns the items (1-based, in the order sent) that
# are not a position of that user, product and asset, with why, and the items whose
# interest is reinvested (auto-subscribe on an active flexible position).
#
# What it reads never changes under a payout (a position's user, product and asset are
# fixed at its creation) or is read at one moment as before (status and auto-subscribe;
# the payout's lock never covered their updates). So it runs outside the lock, and batches
# of one product check their items at the same time, each on its own connection.
# positions_identity (id INCLUDE user, product, asset, kind, status, auto_subscribe)
# answers it in one index-only scan for the batch's ids (a ScalarArrayOp scan reads the
# leaf pages holding them once, instead of one descent per item); the items are matched
# to the positions found in hashed subplans, whose cost does not depend on an estimate
# (a NOT IN and an IS TRUE test are never turned into joins). Only the items not found
# (none when the engine behaves) are kept and sorted, and the reinvested ones (few) are
# the only other pass over the items.
CHECK_ITEMS = r"""
WITH t AS MATERIALIZED (
    SELECT t.n::integer AS n, t.pos, t.u
    FROM unnest(string_to_array($1, E'\n')::bigint[], string_to_array($2, E'\n')) WITH ORDINALITY AS t(pos, u, n)
), p AS MATERIALIZED (
    SELECT p.id, p.user_id, p.auto_subscribe AND p.status = 'active' AND p.kind = 'flexible' AS re
    FROM positions p WHERE p.id = ANY (array(SELECT t.pos FROM t)) AND p.product_id = $3 AND p.asset = $4
), unknown AS MATERIALIZED (
    SELECT t.n, t.pos, t.u FROM t WHERE NOT ((t.pos, t.u) IN (SELECT p.id, p.user_id FROM p))
)
SELECT array(SELECT k.n FROM unknown k ORDER BY k.n) AS unknown,
       array(SELECT format('position %s: no such position of user/product/asset %s/%s/%s', k.pos, k.u, $3, $4)
             FROM unknown k ORDER BY k.n) AS why,
       array(SELECT t.n FROM t WHERE ((t.pos, t.u) IN (SELECT p.id, p.user_id FROM p WHERE p.re)) IS TRUE ORDER BY t.n) AS reinvest
"""

# The second statement, under the payout's lock for (payout, product) (PAYOUT_LOCK),
# taken before its snapshot, so two batches cannot both record one position.
# $1 job, $2 period, $3 partition, $4 sequence, $5 last, $6 product, $7 asset,
# $8 boundary hour, $9 digest, $10 time, $11 inbox consumer, $12 event id,
# $13 position ids and $14 amounts, each one text of lines, $15 from hours, $16 the items
# CHECK_ITEMS found unknown and $17 why, $18 the items it found reinvested, $19 original
# index of each item sent (NULL: all were sent, in order), $20 indexes left out before
# (by the caller's checks), $21 why (NULL: none), $22 the payout's id, $23 the blocks and
# $24 the bitmaps of the items CHECK_ITEMS found (``domain.claim_bitmaps``).
#
# The items recorded go into payout_items as arrays, CHUNK items per row (see migration
# 0005), not one row each. A position recorded by another batch of the payout is left
# out: `paid` finds them by the payout's bitmaps in payout_claims (migration 0006), item
# by item only in the blocks where a bitmap recorded before meets this batch's (none when
# the engine behaves); the batch's bitmaps are then OR-ed in. A payout created before
# migration 0006 (payouts.claims false) has no bitmaps: there `paid` looks among the
# payout's chunks whose range overlaps this batch's, and among the payout's rows in
# interest_records when it has any (recorded before migration 0005).
CHUNK = 200
RECORD_BATCH = r"""
WITH t AS MATERIALIZED (
    SELECT t.n, t.pos, t.m, t.f, t.n NOT IN (SELECT u.n FROM unnest($16::integer[]) AS u(n)) AS ok
    FROM unnest(string_to_array($13, E'\n')::bigint[], string_to_array($14, E'\n')::numeric[], $15::bigint[])
         WITH ORDINALITY AS t(pos, m, f, n)
), o AS MATERIALIZED (
    SELECT o.in_records, o.claims FROM payouts o WHERE o.id = $22
), mine AS MATERIALIZED (
    SELECT m.block, m.bits FROM unnest($23::bigint[], $24::bit({claim_block})[]) AS m(block, bits)
), clash AS MATERIALIZED (
    -- The blocks where a bitmap recorded before meets this batch's (at most one row per block).
    SELECT c.block, c.bits FROM payout_claims c JOIN mine ON mine.block = c.block
    WHERE c.payout_id = $22 AND c.product_id = $6 AND c.block = ANY ($23::bigint[]) AND bit_count(c.bits & mine.bits) > 0
), span AS MATERIALIZED (
    SELECT min(t.pos) AS lo, max(t.pos) AS hi FROM t WHERE t.ok AND NOT (SELECT o.claims FROM o)
), paid AS MATERIALIZED (
    -- A set operation (hashed), not a join whose method a misestimate could turn into a
    -- nested loop over both sides.
    SELECT t.pos FROM t WHERE t.ok
    INTERSECT
    (SELECT t.pos FROM t JOIN clash k ON k.block = t.pos / {claim_block}
     WHERE get_bit(k.bits, (t.pos % {claim_block})::integer) = 1
     UNION ALL
     SELECT u.pos FROM span, payout_items b CROSS JOIN LATERAL unnest(b.position_ids) AS u(pos)
     WHERE b.payout_id = $22 AND b.hi >= span.lo AND b.lo <= span.hi
     UNION ALL
     SELECT r.position_id FROM interest_records r, span
     WHERE r.payout_id = $22 AND r.position_id BETWEEN span.lo AND span.hi AND (SELECT o.in_records FROM o))
), claim AS (
    -- In block order, as every batch of the (payout, product) takes its rows.
    INSERT INTO payout_claims (payout_id, product_id, block, bits)
    SELECT $22, $6, mine.block, mine.bits FROM mine WHERE (SELECT o.claims FROM o) ORDER BY mine.block
    ON CONFLICT (payout_id, product_id, block) DO UPDATE SET bits = payout_claims.bits | excluded.bits
), rec AS MATERIALIZED (
    SELECT t.n, t.pos, t.m, t.f FROM t WHERE t.ok AND t.pos NOT IN (SELECT paid.pos FROM paid)
), ins AS (
    -- Chunks of the batch's items by index (fewer items when some are left out).
    INSERT INTO payout_items (block, payout_id, "partition", sequence, product_id, lo, hi, to_hour, created_at, position_ids, amounts, from_hours)
    SELECT nextval('interest_blocks'), $22, $3, $4, $6, c.lo, c.hi, $8, $10, c.ids, c.ms, c.fs
    FROM (
        SELECT min(rec.pos) AS lo, max(rec.pos) AS hi,
               array_agg(rec.pos ORDER BY rec.n) AS ids, array_agg(rec.m ORDER BY rec.n) AS ms, array_agg(rec.f ORDER BY rec.n) AS fs
        FROM rec GROUP BY (rec.n - 1) / {chunk} ORDER BY (rec.n - 1) / {chunk}
    ) c
), sums AS (
    SELECT count(*)::integer AS items, coalesce(sum(rec.m), 0) AS paid FROM rec
), left_out AS (
    SELECT u.n, u.why FROM unnest($16::integer[], $17::text[]) AS u(n, why)
    UNION ALL
    SELECT t.n, format('position %s: paid before by another batch of %s %s', t.pos, $1::text, $2::text)
    FROM t WHERE t.ok AND t.pos IN (SELECT paid.pos FROM paid)
), inbox_row AS (
    INSERT INTO inbox (consumer, event_id) VALUES ($11, $12::uuid) ON CONFLICT DO NOTHING RETURNING 1
), batch AS (
    INSERT INTO payout_batches (job, period, partition, sequence, last, items, created_at, product_id, asset,
                                boundary_hour, paid, skipped, excluded, problems, reinvest, digest)
    SELECT $1, $2, $3, $4, $5, sums.items, $10, $6, $7, $8, sums.paid, cardinality(x.excluded), x.excluded, x.problems, x.reinvest, $9
    FROM sums, (
        SELECT coalesce($20::integer[], '{{}}') || array(SELECT coalesce(($19::integer[])[l.n], l.n - 1)::integer FROM left_out l ORDER BY l.n) AS excluded,
               nullif(concat_ws(E'\n', $21::text, (SELECT string_agg(l.why, E'\n' ORDER BY l.n) FROM left_out l)), '') AS problems,
               array(SELECT t.pos FROM t WHERE t.n IN (SELECT u.n FROM unnest($18::integer[]) AS u(n))
                     AND t.n NOT IN (SELECT l.n FROM left_out l) ORDER BY t.n) AS reinvest
    ) x
    ON CONFLICT DO NOTHING
    RETURNING items, paid, excluded, problems, reinvest, digest, posted_at
)
SELECT (SELECT count(*) FROM inbox_row) AS first_time, b.* FROM (SELECT) AS one LEFT JOIN batch b ON true
""".format(chunk=CHUNK, claim_block=domain.CLAIM_BLOCK)


def claim_columns(position_ids: str, unknown: list[int]) -> tuple[list[int], list[asyncpg.BitString]]:
    """RECORD_BATCH's $23 blocks and $24 bitmaps (payout_claims) of the items CHECK_ITEMS
    found: every line of ``position_ids`` but the ``unknown`` ones (1-based)."""
    found: Iterable[int] = map(int, position_ids.split("\n"))
    if unknown:
        left_out = set(unknown)
        found = (p for n, p in enumerate(found, 1) if n not in left_out)
    claims = domain.claim_bitmaps(found)
    return list(claims), [asyncpg.BitString.frombytes(bits, domain.CLAIM_BLOCK) for bits in claims.values()]


# Taken (transaction-scoped) before RECORD_BATCH: one batch of a payout and product
# records at a time, so the check for positions recorded before sees every other batch.
PAYOUT_LOCK = "SELECT pg_advisory_xact_lock($1, hashtext($2))"


async def record_payout_batch(
    pool: asyncpg.Pool,
    *,
    job: str,
    period: str,
    payout: int,
    partition: int,
    sequence: int,
    last: bool,
    product_id: str,
    asset: str,
    boundary_hour: int,
    digest: bytes,
    at: datetime,
    consumer: str,
    event_id: str,
    position_ids: str,
    user_ids: str,
    amounts: str,
    from_hours: list[int],
    sent: list[int] | None,
    excluded: list[int],
    problems: str | None,
) -> RecordedBatch | None:
    """Record a payout batch in one transaction: CHECK_ITEMS, then the payout's lock, then
    RECORD_BATCH (only the second statement runs under the lock).

    ``position_ids``, ``user_ids`` and ``amounts`` are the items that passed the caller's
    checks, one per line (each line already checked against its grammar); ``sent`` maps
    them back to the batch's indexes when some were left out before. None: the batch or
    its event was recorded meanwhile (a concurrent delivery): nothing is written."""
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            unknown: list[int] = []
            why: list[str] = []
            reinvest: list[int] = []
            blocks: list[int] = []
            bitmaps: list[asyncpg.BitString] = []
            if position_ids:
                checked = await conn.fetchrow(CHECK_ITEMS, position_ids, user_ids, product_id, asset)
                assert checked is not None
                unknown, why, reinvest = checked["unknown"], checked["why"], checked["reinvest"]
                blocks, bitmaps = claim_columns(position_ids, unknown)
                await conn.execute(PAYOUT_LOCK, payout, product_id)
            row = await conn.fetchrow(
                RECORD_BATCH,
                job, period, partition, sequence, last, product_id, asset, boundary_hour, digest, at, consumer, event_id,
                position_ids, amounts, from_hours, unknown, why, reinvest, sent, excluded, problems, payout, blocks, bitmaps,
            )
            assert row is not None
            if row["items"] is None or not row["first_time"]:
                await tx.rollback()
                return None
        except BaseException:
            await tx.rollback()
            raise
        await tx.commit()
    return _recorded(row)


async def post_payout_batch(
    conn: asyncpg.Connection | asyncpg.Pool, job: str, period: str, partition: int, sequence: int, posting_id: str | None, at: datetime
) -> bool:
    """The wallet confirmed the batch's credit: mark it posted (its partition done when it
    is the last). False when it was posted before (by a concurrent delivery)."""
    return bool(
        await conn.fetchval(
            """
            WITH b AS (
                UPDATE payout_batches SET posting_id = $5, posted_at = $6
                WHERE job = $1 AND period = $2 AND partition = $3 AND sequence = $4 AND posted_at IS NULL
                RETURNING last
            ), done AS (
                INSERT INTO payout_partitions (job, period, partition, done_at)
                SELECT $1, $2, $3, $6 FROM b WHERE b.last ON CONFLICT DO NOTHING
            )
            SELECT count(*) FROM b
            """,
            job, period, partition, sequence, posting_id, at,
        )
    )


async def mark_reinvested(conn: asyncpg.Connection, payout: int, position_id: int) -> None:
    """The position's interest of the payout went back into it (a row of
    payout_reinvestments; a record of the payout in interest_records, from before migration
    0005, carries its own flag)."""
    await conn.execute(
        "INSERT INTO payout_reinvestments (position_id, payout_id) VALUES ($2, $1) ON CONFLICT DO NOTHING", payout, position_id
    )
    await conn.execute("UPDATE interest_records SET reinvested = true WHERE position_id = $2 AND payout_id = $1", payout, position_id)


async def payout_status(pool: asyncpg.Pool, job: str, period: str) -> tuple[int, int, dict[str, Decimal]]:
    """(partitions done, items paid, paid per asset) of a payout, from the totals of its
    posted batches (and, for batches recorded before they kept totals, whose asset is
    NULL, from payout_legacy_totals)."""
    done = await pool.fetchval("SELECT count(*) FROM payout_partitions WHERE job = $1 AND period = $2", job, period)
    rows = await pool.fetch(
        "SELECT asset, sum(items)::bigint AS items, sum(paid) AS paid FROM payout_batches"
        " WHERE job = $1 AND period = $2 AND posted_at IS NOT NULL AND items > 0 AND asset IS NOT NULL GROUP BY asset"
        " UNION ALL SELECT asset, items, paid FROM payout_legacy_totals WHERE job = $1 AND period = $2",
        job, period,
    )
    paid: dict[str, Decimal] = {}
    for r in rows:
        paid[r["asset"]] = paid.get(r["asset"], Decimal(0)) + r["paid"]
    return done, sum(r["items"] for r in rows), paid


async def due_positions(pool: asyncpg.Pool, until_hour: int, limit: int = 1000) -> list[int]:
    rows = await pool.fetch(
        "SELECT id FROM positions WHERE kind = 'fixed' AND status = 'active' AND matures_hour <= $1 ORDER BY matures_hour, id LIMIT $2",
        until_hour, limit,
    )
    return [r["id"] for r in rows]


async def position_holds(conn: asyncpg.Connection | asyncpg.Pool, position_id: int) -> list[tuple[int, Decimal]]:
    rows = await conn.fetch("SELECT hold_id, remaining FROM position_holds WHERE position_id = $1 AND remaining > 0 ORDER BY hold_id", position_id)
    return [(r["hold_id"], r["remaining"]) for r in rows]


# ---- payout previews --------------------------------------------------------------------


async def preview_positions(pool: asyncpg.Pool, product_ids: list[str], after_id: int, limit: int) -> list[asyncpg.Record]:
    """Flexible positions of ``product_ids`` that may still be owed interest, by id: the
    open ones and the closed ones not yet paid through their closing hour."""
    return await pool.fetch(
        "SELECT p.id, p.user_id, p.product_id, p.asset, p.status FROM positions p"
        " WHERE p.id > $1 AND p.kind = 'flexible' AND p.product_id = ANY($2::text[])"
        " AND (p.status = 'active' OR p.closed_from_hour > coalesce("
        "   (SELECT max(i.to_hour) FROM position_interest(p.id) i"
        "    WHERE i.payout_id <> (SELECT id FROM payouts WHERE job = $3 AND period = '')), -1))"
        " ORDER BY p.id LIMIT $4",
        after_id, product_ids, MATURITY_JOB, limit,
    )


async def changes_of(pool: asyncpg.Pool, position_ids: list[int]) -> dict[int, list[tuple[int, Decimal]]]:
    rows = await pool.fetch(
        "SELECT position_id, effective_hour, delta FROM principal_changes WHERE position_id = ANY($1::bigint[]) ORDER BY position_id, id",
        position_ids,
    )
    out: dict[int, list[tuple[int, Decimal]]] = {}
    for r in rows:
        out.setdefault(r["position_id"], []).append((r["effective_hour"], r["delta"]))
    return out


@dataclass(frozen=True, slots=True)
class PaidSoFar:
    last_boundary: int  # the boundary of the position's last payout
    paid: Decimal  # the sum of its payouts


async def payouts_so_far(pool: asyncpg.Pool, position_ids: list[int], job: str, period: str) -> dict[int, PaidSoFar]:
    """Per position: its payouts recorded before, other than (job, period) itself."""
    rows = await pool.fetch(
        "SELECT x.position_id, max(i.to_hour) AS last_boundary, sum(i.amount) AS paid"
        " FROM unnest($1::bigint[]) AS x(position_id) CROSS JOIN LATERAL position_interest(x.position_id) i"
        " WHERE i.payout_id NOT IN (SELECT id FROM payouts WHERE (job = $2 AND period = '') OR (job = $3 AND period = $4))"
        " GROUP BY x.position_id",
        position_ids, MATURITY_JOB, job, period,
    )
    return {r["position_id"]: PaidSoFar(r["last_boundary"], r["paid"]) for r in rows}


async def recorded_payouts(pool: asyncpg.Pool, position_ids: list[int], job: str, period: str) -> dict[int, asyncpg.Record]:
    """The items (job, period) already paid, per position."""
    rows = await pool.fetch(
        "WITH o AS (SELECT id FROM payouts WHERE job = $1 AND period = $2)"
        " SELECT r.position_id, r.amount, r.from_hour FROM interest_records r, o WHERE r.payout_id = o.id AND r.position_id = ANY($3::bigint[])"
        " UNION ALL"
        " SELECT x.position_id, b.amounts[k], b.from_hours[k] FROM o, unnest($3::bigint[]) AS x(position_id)"
        " JOIN payout_items b ON b.hi >= x.position_id AND b.lo <= x.position_id"
        " CROSS JOIN LATERAL array_position(b.position_ids, x.position_id) AS k WHERE b.payout_id = o.id AND k IS NOT NULL",
        job, period, position_ids,
    )
    return {r["position_id"]: r for r in rows}
