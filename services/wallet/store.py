"""Wallet persistence (asyncpg). Every function runs inside the caller's transaction.

Posting protocol (``post``): make sure the accounts exist, lock them in id order (no
deadlocks between concurrent postings), apply the orders with the pure domain rules,
write the new balances, the posting, its transfers and its outbox event. Set-based
statements (unnest arrays) keep a 10,000-transfer batch to a handful of round trips.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from services.kernel import outbox
from services.kernel.config import Settings
from services.kernel.errors import NotFound
from services.kernel.money import format_amount
from services.wallet import domain
from services.wallet.domain import AccountKey, Applied, HoldState, Kind, Order

from earn.v1 import wallet_pb2

PRODUCER = "wallet"
TOPIC = "wallet.transfers"


@dataclass(frozen=True, slots=True)
class Posted:
    posting_id: int
    created_at: datetime
    transfer_ids: list[int]
    applied: list[Applied]


async def _lock_accounts(conn: asyncpg.Connection, keys: set[AccountKey]) -> dict[AccountKey, tuple[int, Decimal]]:
    ordered = sorted(keys)
    owners = [k.owner for k in ordered]
    assets = [k.asset for k in ordered]
    kinds = [k.kind.value for k in ordered]
    await conn.execute(
        "INSERT INTO accounts (owner, asset, kind, may_go_negative)"
        " SELECT o, a, k, k = ANY($4::text[]) FROM unnest($1::text[], $2::text[], $3::text[]) AS t(o, a, k)"
        " ON CONFLICT (owner, asset, kind) DO NOTHING",
        owners,
        assets,
        kinds,
        [k.value for k in domain.MAY_GO_NEGATIVE],
    )
    rows = await conn.fetch(
        "SELECT a.id, a.owner, a.asset, a.kind, a.balance FROM accounts a"
        " JOIN unnest($1::text[], $2::text[], $3::text[]) AS t(o, s, k)"
        "   ON a.owner = t.o AND a.asset = t.s AND a.kind = t.k"
        " ORDER BY a.id FOR UPDATE OF a",
        owners,
        assets,
        kinds,
    )
    return {AccountKey(r["owner"], r["asset"], Kind(r["kind"])): (r["id"], r["balance"]) for r in rows}


async def post(
    conn: asyncpg.Connection, settings: Settings, kind: str, orders: list[Order]
) -> Posted:
    """Apply ``orders`` atomically as one posting and announce it on the outbox."""
    keys = {o.source for o in orders} | {o.destination for o in orders}
    locked = await _lock_accounts(conn, keys)
    balances, applied = domain.apply({k: v[1] for k, v in locked.items()}, orders)
    ids = {k: v[0] for k, v in locked.items()}
    touched = [k for k in balances if balances[k] != locked[k][1]]
    await conn.execute(
        "UPDATE accounts SET balance = t.b FROM unnest($1::bigint[], $2::numeric[]) AS t(i, b) WHERE id = t.i",
        [ids[k] for k in touched],
        [balances[k] for k in touched],
    )
    posting_id, created_at = await conn.fetchrow(
        "INSERT INTO postings (kind, created_at) VALUES ($1, clock_timestamp()) RETURNING id, created_at", kind
    )
    transfer_ids: list[int] = await conn.fetchval(
        "SELECT array_agg(nextval('transfers_id_seq')) FROM generate_series(1, $1)", len(orders)
    )
    transfer_ids.sort()
    await conn.execute(
        "INSERT INTO transfers (id, posting_id, asset, source_id, destination_id, amount, reference, created_at)"
        " SELECT i, $2, a, s, d, m, r, $3"
        " FROM unnest($1::bigint[], $4::text[], $5::bigint[], $6::bigint[], $7::numeric[], $8::text[]) AS t(i, a, s, d, m, r)",
        transfer_ids,
        posting_id,
        created_at,
        [o.asset for o in orders],
        [ids[o.source] for o in orders],
        [ids[o.destination] for o in orders],
        [o.amount for o in orders],
        [o.reference for o in orders],
    )
    posted = Posted(posting_id, created_at, transfer_ids, applied)
    await outbox.enqueue(
        conn, settings, PRODUCER, created_at, [outbox.Outgoing(TOPIC, str(posting_id), event(kind, posted))]
    )
    return posted


def account_ref(key: AccountKey) -> wallet_pb2.AccountRef:
    return wallet_pb2.AccountRef(owner=key.owner, kind=KIND_TO_PROTO[key.kind])


def transfer_message(
    transfer_id: int, posting_id: int, item: Order, created_at: datetime
) -> wallet_pb2.Transfer:
    msg = wallet_pb2.Transfer(
        transfer_id=str(transfer_id),
        posting_id=str(posting_id),
        asset=item.asset,
        source=account_ref(item.source),
        destination=account_ref(item.destination),
        amount=format_amount(item.amount),
        reference=item.reference,
    )
    msg.created_at.FromDatetime(created_at)
    return msg


def event(kind: str, posted: Posted) -> wallet_pb2.TransfersPosted:
    return wallet_pb2.TransfersPosted(
        posting_id=str(posted.posting_id),
        posting_kind=kind,
        transfers=[
            wallet_pb2.PostedTransfer(
                transfer=transfer_message(tid, posted.posting_id, a.order, posted.created_at),
                source_balance_after=format_amount(a.source_after),
                destination_balance_after=format_amount(a.destination_after),
            )
            for tid, a in zip(posted.transfer_ids, posted.applied, strict=True)
        ],
    )


KIND_TO_PROTO = {
    Kind.FUNDING: wallet_pb2.ACCOUNT_KIND_FUNDING,
    Kind.HOLD: wallet_pb2.ACCOUNT_KIND_HOLD,
    Kind.EXTERNAL: wallet_pb2.ACCOUNT_KIND_EXTERNAL,
    Kind.EXPENSE: wallet_pb2.ACCOUNT_KIND_EXPENSE,
    Kind.TREASURY: wallet_pb2.ACCOUNT_KIND_TREASURY,
    Kind.REWARD_POOL: wallet_pb2.ACCOUNT_KIND_REWARD_POOL,
    Kind.FEE_INCOME: wallet_pb2.ACCOUNT_KIND_FEE_INCOME,
}
KIND_FROM_PROTO = {v: k for k, v in KIND_TO_PROTO.items()}


# ---- holds ---------------------------------------------------------------------------

_HOLD_COLUMNS = "id, owner, asset, holder, amount, remaining, reference, created_at"


def hold_message(row: asyncpg.Record) -> wallet_pb2.Hold:
    msg = wallet_pb2.Hold(
        hold_id=str(row["id"]),
        owner=row["owner"],
        asset=row["asset"],
        holder=row["holder"],
        amount=format_amount(row["amount"]),
        remaining=format_amount(row["remaining"]),
        status=wallet_pb2.HOLD_STATUS_ACTIVE if row["remaining"] > 0 else wallet_pb2.HOLD_STATUS_CLOSED,
        reference=row["reference"],
    )
    msg.created_at.FromDatetime(row["created_at"])
    return msg


async def insert_hold(conn: asyncpg.Connection, owner: str, asset: str, holder: str, amount: Decimal, reference: str, at: datetime) -> asyncpg.Record:
    return await conn.fetchrow(
        "INSERT INTO holds (owner, asset, holder, amount, remaining, reference, created_at, updated_at)"
        f" VALUES ($1, $2, $3, $4, $4, $5, $6, $6) RETURNING {_HOLD_COLUMNS}",
        owner, asset, holder, amount, reference, at,
    )


async def lock_hold(conn: asyncpg.Connection, hold_id: int) -> HoldState:
    row = await conn.fetchrow("SELECT id, owner, asset, amount, remaining FROM holds WHERE id = $1 FOR UPDATE", hold_id)
    if row is None:
        raise NotFound(f"hold_id: no hold {hold_id}")
    return HoldState(row["id"], row["owner"], row["asset"], row["amount"], row["remaining"])


async def reduce_hold(conn: asyncpg.Connection, hold_id: int, by: Decimal, at: datetime) -> asyncpg.Record:
    return await conn.fetchrow(
        f"UPDATE holds SET remaining = remaining - $2, updated_at = $3 WHERE id = $1 RETURNING {_HOLD_COLUMNS}",
        hold_id, by, at,
    )


async def get_hold(conn: asyncpg.Connection | asyncpg.Pool, hold_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(f"SELECT {_HOLD_COLUMNS} FROM holds WHERE id = $1", hold_id)
    if row is None:
        raise NotFound(f"hold_id: no hold {hold_id}")
    return row


# ---- queries -------------------------------------------------------------------------


async def balances(pool: asyncpg.Pool, owner: str, asset: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT owner, asset, kind, balance FROM accounts"
        " WHERE owner = $1 AND ($2 = '' OR asset = $2) ORDER BY asset, kind",
        owner, asset,
    )


async def list_transfers(
    pool: asyncpg.Pool,
    *,
    owner: str,
    asset: str,
    posting_id: int | None,
    created_from: datetime | None,
    created_to: datetime | None,
    after_id: int,
    limit: int,
) -> list[asyncpg.Record]:
    return await pool.fetch(
        """
        WITH mine AS (SELECT id FROM accounts WHERE owner = $1)
        SELECT t.id, t.posting_id, t.asset, t.amount, t.reference, t.created_at,
               s.owner AS s_owner, s.kind AS s_kind, d.owner AS d_owner, d.kind AS d_kind
        FROM transfers t
        JOIN accounts s ON s.id = t.source_id
        JOIN accounts d ON d.id = t.destination_id
        WHERE t.id > $6
          AND ($1 = '' OR t.source_id IN (SELECT id FROM mine) OR t.destination_id IN (SELECT id FROM mine))
          AND ($2 = '' OR t.asset = $2)
          AND ($3::bigint IS NULL OR t.posting_id = $3)
          AND ($4::timestamptz IS NULL OR t.created_at >= $4)
          AND ($5::timestamptz IS NULL OR t.created_at < $5)
        ORDER BY t.id
        LIMIT $7
        """,
        owner, asset, posting_id, created_from, created_to, after_id, limit,
    )


async def ledger_totals(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT asset, sum(balance) AS total, count(*) AS accounts,"
        " count(*) FILTER (WHERE kind = ANY($1::text[]) AND balance < 0) AS negative_user_accounts"
        " FROM accounts GROUP BY asset ORDER BY asset",
        [k.value for k in domain.USER_KINDS],
    )
