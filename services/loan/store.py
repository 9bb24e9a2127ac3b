"""Crypto Loan SQL."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from services.kernel.money import format_amount

from earn.v1 import loan_pb2 as ln

Conn = asyncpg.Connection | asyncpg.Pool


# ---- configuration -------------------------------------------------------------------------


async def upsert_loan_asset(conn: Conn, asset: str, rate: Decimal, fixed7: Decimal | None, fixed30: Decimal | None,
                            minimum: Decimal, maximum: Decimal, at: datetime) -> None:
    await conn.execute(
        "INSERT INTO loan_assets (asset, hourly_rate, fixed_7_days_hourly_rate, fixed_30_days_hourly_rate, min_borrow, max_borrow, updated_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (asset) DO UPDATE SET hourly_rate = $2, fixed_7_days_hourly_rate = $3,"
        " fixed_30_days_hourly_rate = $4, min_borrow = $5, max_borrow = $6, updated_at = $7",
        asset, rate, fixed7, fixed30, minimum, maximum, at,
    )


async def loan_asset(conn: Conn, asset: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM loan_assets WHERE asset = $1", asset)


async def loan_assets(conn: Conn) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM loan_assets ORDER BY asset")


def loan_asset_message(row: asyncpg.Record) -> ln.LoanAsset:
    def text(v: Decimal | None) -> str:
        return "" if v is None else format_amount(v)

    return ln.LoanAsset(
        asset=row["asset"], hourly_rate=text(row["hourly_rate"]), fixed_7_days_hourly_rate=text(row["fixed_7_days_hourly_rate"]),
        fixed_30_days_hourly_rate=text(row["fixed_30_days_hourly_rate"]), min_borrow=text(row["min_borrow"]), max_borrow=text(row["max_borrow"]),
    )


async def upsert_collateral_asset(conn: Conn, asset: str, discount: Decimal, at: datetime) -> None:
    await conn.execute(
        "INSERT INTO collateral_assets (asset, discount, updated_at) VALUES ($1, $2, $3)"
        " ON CONFLICT (asset) DO UPDATE SET discount = $2, updated_at = $3",
        asset, discount, at,
    )


async def collateral_assets(conn: Conn) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM collateral_assets ORDER BY asset")


# ---- loans ---------------------------------------------------------------------------------


async def loan(conn: Conn, loan_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM loans WHERE loan_id = $1", loan_id)


async def collateral(conn: Conn, loan_id: str) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM loan_collateral WHERE loan_id = $1 ORDER BY position", loan_id)


async def holds(conn: Conn, loan_id: str) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM loan_holds WHERE loan_id = $1 AND remaining > 0 ORDER BY hold_id", loan_id)


async def list_loans(conn: Conn, user: str, status: str, after: str, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM loans WHERE ($1 = '' OR user_id = $1) AND ($2 = '' OR status = $2) AND loan_id > $3 ORDER BY loan_id LIMIT $4",
        user, status, after, limit,
    )


async def insert_loan(conn: asyncpg.Connection, s: dict[str, Any]) -> None:
    await conn.execute(
        "INSERT INTO loans (loan_id, user_id, loan_asset, term, hourly_rate, principal_units, interest_units, carry_e10, start_hour,"
        " charged_through, initial_ltv, margin_call_ltv, liquidation_ltv, liquidation_fee, rearm_band, status, version, borrowed_us, due_us, closed_us)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)",
        s["loan_id"], s["user_id"], s["loan_asset"], s["term"], Decimal(s["hourly_rate"]), s["principal_units"], s["interest_units"],
        s["carry_e10"], s["start_hour"], s["charged_through"], Decimal(s["initial_ltv"]), Decimal(s["margin_call_ltv"]),
        Decimal(s["liquidation_ltv"]), Decimal(s["liquidation_fee"]), Decimal(s["rearm_band"]), s["status"], s["version"],
        s["borrowed_us"], s["due_us"], s["closed_us"],
    )


async def update_loan(conn: asyncpg.Connection, s: dict[str, Any]) -> bool:
    """The new state, only over the version it was computed from."""
    return bool(await conn.fetchval(
        "UPDATE loans SET principal_units = $2, interest_units = $3, carry_e10 = $4, charged_through = $5, status = $6, version = $7,"
        " closed_us = $8 WHERE loan_id = $1 AND version = $7 - 1 RETURNING true",
        s["loan_id"], s["principal_units"], s["interest_units"], s["carry_e10"], s["charged_through"], s["status"], s["version"], s["closed_us"],
    ))


async def set_collateral(conn: asyncpg.Connection, loan_id: str, items: list[tuple[str, int, Decimal, int]]) -> None:
    for asset, units, discount, position in items:
        await conn.execute(
            "INSERT INTO loan_collateral (loan_id, position, asset, amount_units, discount) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (loan_id, asset) DO UPDATE SET amount_units = $4",
            loan_id, position, asset, units, discount,
        )


async def add_hold(conn: asyncpg.Connection, loan_id: str, asset: str, hold_id: int, units: int) -> None:
    await conn.execute(
        "INSERT INTO loan_holds (loan_id, asset, hold_id, remaining) VALUES ($1, $2, $3, $4) ON CONFLICT (hold_id) DO NOTHING",
        loan_id, asset, hold_id, units,
    )


async def take_from_hold(conn: asyncpg.Connection, hold_id: int, units: int) -> None:
    await conn.execute("UPDATE loan_holds SET remaining = remaining - $2 WHERE hold_id = $1", hold_id, units)


async def add_history(conn: asyncpg.Connection, loan_id: str, version: int, at_us: int, cause: str, principal: int, interest: int,
                      ltv: Decimal | None) -> None:
    await conn.execute(
        "INSERT INTO loan_history (loan_id, version, at_us, cause, principal_units, interest_units, ltv) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        loan_id, version, at_us, cause, principal, interest, ltv,
    )


async def history(conn: Conn, loan_id: str) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM loan_history WHERE loan_id = $1 ORDER BY version", loan_id)


async def add_event(conn: asyncpg.Connection, loan_id: str, e: dict[str, Any]) -> bool:
    """Once per (loan, kind, version), and one liquidation per loan."""
    return bool(await conn.fetchval(
        "INSERT INTO loan_events (loan_id, kind, version, seq, ltv, at_us, price_us, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT DO NOTHING RETURNING true",
        loan_id, e["kind"], e["version"], e.get("seq", 0), Decimal(e["ltv"]), e["at_us"], e["price_us"],
        json.dumps(e["detail"]) if e["detail"] else None,
    ))


async def add_events(conn: asyncpg.Connection, rows: list[dict[str, Any]]) -> list[asyncpg.Record]:
    """Many events without details at once (an engine batch's margin calls and re-arms),
    each once per (loan, kind, version, seq), for loans that exist; returns those new."""
    if not rows:
        return []
    return await conn.fetch(
        "INSERT INTO loan_events (loan_id, kind, version, seq, ltv, at_us, price_us)"
        " SELECT e.loan_id, e.kind, e.version, e.seq, e.ltv, e.at_us, e.price_us"
        " FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::numeric[], $6::bigint[], $7::bigint[])"
        "   AS e (loan_id, kind, version, seq, ltv, at_us, price_us)"
        " WHERE EXISTS (SELECT 1 FROM loans l WHERE l.loan_id = e.loan_id)"
        " ON CONFLICT DO NOTHING RETURNING kind, price_us",
        [r["loan_id"] for r in rows], [r["kind"] for r in rows], [r["version"] for r in rows], [r["seq"] for r in rows],
        [Decimal(r["ltv"]) for r in rows], [r["at_us"] for r in rows], [r["price_us"] for r in rows],
    )


async def events(conn: Conn, loan_id: str, kind: str) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM loan_events WHERE loan_id = $1 AND ($2 = '' OR kind = $2) ORDER BY id", loan_id, kind)


# ---- operations ----------------------------------------------------------------------------


async def insert_op(conn: asyncpg.Connection, op_key: str, loan_id: str, kind: str, plan: str, at_us: int) -> None:
    await conn.execute(
        "INSERT INTO loan_ops (op_key, loan_id, kind, plan, created_us) VALUES ($1, $2, $3, $4::jsonb, $5)", op_key, loan_id, kind, plan, at_us
    )


async def op(conn: Conn, op_key: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM loan_ops WHERE op_key = $1", op_key)


async def op_done(conn: asyncpg.Connection, op_key: str) -> None:
    await conn.execute("UPDATE loan_ops SET status = 'done' WHERE op_key = $1", op_key)


async def fail_op(conn: Conn, op_key: str, reason: str) -> None:
    await conn.execute("UPDATE loan_ops SET status = 'failed', reason = $2 WHERE op_key = $1 AND status = 'pending'", op_key, reason[:2000])


async def pending_ops(conn: Conn, before_us: int) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT op_key, loan_id FROM loan_ops WHERE status = 'pending' AND created_us < $1 ORDER BY created_us LIMIT 100",
                            before_us)


async def due_loans(conn: Conn, until_us: int) -> list[str]:
    """Open fixed-term loans due by ``until_us``, the earliest first."""
    rows = await conn.fetch("SELECT loan_id FROM loans WHERE status = 'open' AND due_us IS NOT NULL AND due_us <= $1 ORDER BY due_us, loan_id",
                            until_us)
    return [r["loan_id"] for r in rows]


async def hour_started(conn: asyncpg.Connection, hour: int) -> bool:
    return bool(await conn.fetchval("INSERT INTO loan_hours (hour) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true", hour))
