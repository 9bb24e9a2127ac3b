"""Smart Leverage SQL."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from services.kernel.errors import NotFound
from services.leverage.domain import Product

Conn = asyncpg.Connection | asyncpg.Pool


def product_of(row: asyncpg.Record) -> Product:
    return Product(
        row["product_id"], row["base_asset"], row["quote_asset"], row["max_leverage"], row["fee_rate"], row["min_principal"],
        row["max_principal"], row["max_term_hours"], row["window_seconds"],
    )


async def insert_product(conn: asyncpg.Connection, p: Product, at: datetime) -> bool:
    return bool(await conn.fetchval(
        "INSERT INTO products (product_id, base_asset, quote_asset, max_leverage, fee_rate, min_principal, max_principal, max_term_hours,"
        " window_seconds, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (product_id) DO NOTHING RETURNING true",
        p.product_id, p.base, p.quote, p.max_leverage, p.fee_rate, p.min_principal, p.max_principal, p.max_term_hours, p.window_seconds, at,
    ))


async def product(conn: Conn, product_id: str) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM products WHERE product_id = $1", product_id)
    if row is None:
        raise NotFound(f"product_id: no product {product_id}")
    return row


async def products(conn: Conn, base: str, quote: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM products WHERE ($1 = '' OR base_asset = $1) AND ($2 = '' OR quote_asset = $2) ORDER BY product_id", base, quote
    )


# ---- quotes ----------------------------------------------------------------------------


async def insert_quote(conn: asyncpg.Connection, q: dict[str, Any]) -> asyncpg.Record:
    return await conn.fetchrow(
        "INSERT INTO quotes (quote_id, user_id, product_id, direction, leverage, principal, maturity_us, index_price, index_us, entry_price,"
        " breakeven_price, quoted_us, expires_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING *",
        q["quote_id"], q["user_id"], q["product_id"], q["direction"], q["leverage"], q["principal"], q["maturity_us"], q["index_price"],
        q["index_us"], q["entry_price"], q["breakeven_price"], q["quoted_us"], q["expires_us"],
    )


async def quote(conn: Conn, quote_id: str, *, lock: bool = False) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM quotes WHERE quote_id = $1" + (" FOR UPDATE" if lock else ""), quote_id)


async def quote_held(conn: Conn, quote_id: str, hold_id: int) -> None:
    await conn.execute("UPDATE quotes SET hold_id = $2, hold_state = 'held' WHERE quote_id = $1 AND hold_state = 'none'", quote_id, hold_id)


async def abandon_expired_holds(conn: asyncpg.Connection, now_us: int) -> None:
    """Holds of quotes that expired without a position: no subscription can use them now
    (a subscription records its position under the quote's row lock, refusing an abandoned one)."""
    await conn.execute(
        "UPDATE quotes q SET hold_state = 'abandoned' WHERE q.quote_id IN (SELECT quote_id FROM quotes WHERE hold_state = 'held'"
        " AND expires_us < $1 AND NOT EXISTS (SELECT 1 FROM positions p WHERE p.quote_id = quotes.quote_id) ORDER BY quote_id"
        " FOR UPDATE SKIP LOCKED LIMIT 100)",
        now_us,
    )


async def abandoned_holds(conn: Conn) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT quote_id, hold_id FROM quotes WHERE hold_state = 'abandoned' ORDER BY quote_id LIMIT 100")


async def hold_released(conn: Conn, quote_id: str) -> None:
    await conn.execute("UPDATE quotes SET hold_state = 'released' WHERE quote_id = $1 AND hold_state = 'abandoned'", quote_id)


# ---- positions -------------------------------------------------------------------------


async def insert_position(conn: asyncpg.Connection, q: asyncpg.Record, p: Product, hold_id: int, opened_us: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "INSERT INTO positions (quote_id, user_id, product_id, base_asset, quote_asset, direction, leverage, principal, entry_price,"
        " breakeven_price, maturity_us, window_seconds, opened_us, hold_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        " ON CONFLICT DO NOTHING RETURNING *",
        q["quote_id"], q["user_id"], p.product_id, p.base, p.quote, q["direction"], q["leverage"], q["principal"], q["entry_price"],
        q["breakeven_price"], q["maturity_us"], p.window_seconds, opened_us, hold_id,
    )


async def position(conn: Conn, position_id: int, *, lock: bool = False) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM positions WHERE id = $1" + (" FOR UPDATE" if lock else ""), position_id)


async def position_of_quote(conn: Conn, quote_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM positions WHERE quote_id = $1", quote_id)


async def list_positions(conn: Conn, user: str, product_id: str, status: str, after: int, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM positions WHERE ($1 = '' OR user_id = $1) AND ($2 = '' OR product_id = $2) AND ($3 = '' OR status = $3)"
        " AND id > $4 ORDER BY id LIMIT $5",
        user, product_id, status, after, limit,
    )


async def exposure(conn: Conn) -> list[asyncpg.Record]:
    """Open notional (principal x leverage) per underlying and direction: positions whose price is not fixed."""
    return await conn.fetch(
        "SELECT base_asset, direction, sum(principal * leverage) AS notional FROM positions WHERE settlement_price IS NULL"
        " GROUP BY base_asset, direction ORDER BY base_asset, direction"
    )


async def fix_early(conn: asyncpg.Connection, position_id: int, price: Decimal, payoff: Decimal) -> None:
    await conn.execute(
        "UPDATE positions SET status = 'settling', close_kind = 'early', settlement_price = $2, payoff = $3, failure_reason = NULL"
        " WHERE id = $1 AND settlement_price IS NULL",
        position_id, price, payoff,
    )


# ---- settlement ------------------------------------------------------------------------


async def due_groups(conn: Conn, until_us: int) -> list[asyncpg.Record]:
    """(pair, maturity, window) of positions due whose price is not fixed yet."""
    return await conn.fetch(
        "SELECT base_asset, quote_asset, maturity_us, window_seconds, count(*) AS n FROM positions"
        " WHERE maturity_us <= $1 AND settlement_price IS NULL GROUP BY 1, 2, 3, 4 ORDER BY 3, 1, 2, 4",
        until_us,
    )


async def fail_group(conn: Conn, g: asyncpg.Record, reason: str) -> None:
    await conn.execute(
        "UPDATE positions SET status = 'failed', failure_reason = $5 WHERE base_asset = $1 AND quote_asset = $2 AND maturity_us = $3"
        " AND window_seconds = $4 AND settlement_price IS NULL",
        g["base_asset"], g["quote_asset"], g["maturity_us"], g["window_seconds"], reason,
    )


async def group_positions(conn: asyncpg.Connection, g: asyncpg.Record) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM positions WHERE base_asset = $1 AND quote_asset = $2 AND maturity_us = $3 AND window_seconds = $4"
        " AND settlement_price IS NULL ORDER BY id FOR UPDATE",
        g["base_asset"], g["quote_asset"], g["maturity_us"], g["window_seconds"],
    )


async def fix_maturity(conn: asyncpg.Connection, records: list[tuple[int, Decimal]], price: Decimal, ticks: int) -> None:
    await conn.execute(
        "UPDATE positions p SET status = 'settling', close_kind = 'maturity', settlement_price = $1, twap_ticks = $2, payoff = r.v,"
        " failure_reason = NULL FROM unnest($3::bigint[], $4::numeric[]) AS r(i, v) WHERE p.id = r.i AND p.settlement_price IS NULL",
        price, ticks, [r[0] for r in records], [r[1] for r in records],
    )


async def to_pay(conn: Conn, until_us: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM positions WHERE status <> 'settled' AND payoff IS NOT NULL AND (maturity_us <= $1 OR close_kind = 'early') ORDER BY id",
        until_us,
    )


async def set_payout(conn: Conn, position_id: int, payout: Decimal) -> Decimal:
    """Fix the payout once; returns the fixed one."""
    await conn.execute("UPDATE positions SET payout = $2 WHERE id = $1 AND payout IS NULL", position_id, payout)
    return await conn.fetchval("SELECT payout FROM positions WHERE id = $1", position_id)


async def clear_payout(conn: Conn, position_id: int, reason: str) -> None:
    """The transfer was refused (nothing moved): the next attempt caps again."""
    await conn.execute(
        "UPDATE positions SET payout = NULL, status = 'failed', failure_reason = $2 WHERE id = $1 AND status <> 'settled'", position_id, reason
    )


async def fail_position(conn: Conn, position_id: int, reason: str) -> None:
    await conn.execute("UPDATE positions SET status = 'failed', failure_reason = $2 WHERE id = $1 AND status <> 'settled'", position_id, reason)


async def mark_settled(conn: Conn, position_id: int, at: datetime) -> bool:
    return bool(await conn.fetchval(
        "UPDATE positions SET status = 'settled', failure_reason = NULL, settled_at = $2 WHERE id = $1 AND status <> 'settled' RETURNING true",
        position_id, at,
    ))

