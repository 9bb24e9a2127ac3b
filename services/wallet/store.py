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
from services.wallet.domain import AccountKey, HoldState, Kind, Order

from earn.v1 import wallet_pb2

PRODUCER = "wallet"
TOPIC = "wallet.transfers"


@dataclass(frozen=True, slots=True)
class Posted:
    posting_id: int
    created_at: datetime
    transfer_ids: list[int]
    orders: list[Order]


def _sort_key(key: AccountKey) -> tuple[str, str, str]:
    return (key.owner, key.asset, key.kind.value)


async def _ensure_accounts(conn: asyncpg.Connection, keys: list[AccountKey]) -> None:
    """Create missing accounts, in key order (concurrent postings never deadlock here)."""
    ordered = sorted(set(keys), key=_sort_key)
    await conn.execute(
        "INSERT INTO accounts (owner, asset, kind, may_go_negative)"
        " SELECT o, a, k, k = ANY($4::text[]) FROM unnest($1::text[], $2::text[], $3::text[]) AS t(o, a, k)"
        " ON CONFLICT (owner, asset, kind) DO NOTHING",
        [k.owner for k in ordered],
        [k.asset for k in ordered],
        [k.kind.value for k in ordered],
        [k.value for k in domain.MAY_GO_NEGATIVE],
    )


async def _lock_accounts(conn: asyncpg.Connection, keys: set[AccountKey]) -> dict[AccountKey, tuple[int, Decimal]]:
    """Lock the accounts (in id order: no deadlocks) and fold their pending credits."""
    await _ensure_accounts(conn, list(keys))
    ordered = sorted(keys, key=_sort_key)
    rows = await conn.fetch(
        "SELECT a.id, a.owner, a.asset, a.kind, a.balance FROM accounts a"
        " JOIN unnest($1::text[], $2::text[], $3::text[]) AS t(o, s, k)"
        "   ON a.owner = t.o AND a.asset = t.s AND a.kind = t.k"
        " ORDER BY a.id FOR UPDATE OF a",
        [k.owner for k in ordered],
        [k.asset for k in ordered],
        [k.kind.value for k in ordered],
    )
    folded = await fold_pending(conn, [r["id"] for r in rows])
    return {
        AccountKey(r["owner"], r["asset"], Kind(r["kind"])): (r["id"], folded.get(r["id"], r["balance"]))
        for r in rows
    }


async def fold_pending(conn: asyncpg.Connection, account_ids: list[int]) -> dict[int, Decimal]:
    """Add the pending bulk credits of locked accounts to their balances; returns the new
    balances of the accounts that had some."""
    rows = await conn.fetch(
        """
        WITH folded AS (
            UPDATE transfers SET pending = false
            WHERE pending AND destination_id = ANY($1::bigint[])
            RETURNING destination_id, amount
        ), sums AS (
            SELECT destination_id, sum(amount) AS amount FROM folded GROUP BY destination_id
        )
        UPDATE accounts a SET balance = a.balance + sums.amount
        FROM sums WHERE a.id = sums.destination_id
        RETURNING a.id, a.balance
        """,
        account_ids,
    )
    return {r["id"]: r["balance"] for r in rows}


async def fold_some_pending(pool: asyncpg.Pool, limit: int = 5000) -> int:
    """Background compaction: fold pending credits of up to ``limit`` accounts that no
    posting holds right now. Returns how many accounts it folded."""
    async with pool.acquire() as conn, conn.transaction():
        ids = await conn.fetchval(
            "SELECT array_agg(id) FROM (SELECT id FROM accounts WHERE id IN"
            " (SELECT DISTINCT destination_id FROM transfers WHERE pending LIMIT $1)"
            " ORDER BY id FOR UPDATE SKIP LOCKED) AS l",
            limit,
        )
        if not ids:
            return 0
        return len(await fold_pending(conn, ids))


async def _insert_posting(
    conn: asyncpg.Connection, kind: str, orders: list[Order], source_ids: list[int], destination_ids: list[int], *, pending: bool
) -> tuple[int, datetime, list[int]]:
    posting_id, created_at = await conn.fetchrow(
        "INSERT INTO postings (kind, created_at) VALUES ($1, clock_timestamp()) RETURNING id, created_at", kind
    )
    transfer_ids: list[int] = await conn.fetchval(
        "SELECT array_agg(nextval('transfers_id_seq')) FROM generate_series(1, $1)", len(orders)
    )
    transfer_ids.sort()
    await conn.copy_records_to_table(
        "transfers",
        columns=["id", "posting_id", "asset", "source_id", "destination_id", "amount", "reference", "created_at", "pending"],
        records=[
            (tid, posting_id, o.asset, sid, did, o.amount, o.reference, created_at, pending)
            for tid, o, sid, did in zip(transfer_ids, orders, source_ids, destination_ids, strict=True)
        ],
    )
    return posting_id, created_at, transfer_ids


async def post(
    conn: asyncpg.Connection, settings: Settings, kind: str, orders: list[Order]
) -> Posted:
    """Apply ``orders`` atomically as one posting and announce it on the outbox."""
    source = domain.bulk_credit_source(orders)
    if source is not None:
        return await _post_bulk_credit(conn, settings, kind, source, orders)
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
    posting_id, created_at, transfer_ids = await _insert_posting(
        conn, kind, orders, [ids[o.source] for o in orders], [ids[o.destination] for o in orders], pending=False
    )
    posted = Posted(posting_id, created_at, transfer_ids, orders)
    message = _event(kind, posted)
    message.transfers.extend(
        wallet_pb2.PostedTransfer(
            transfer=transfer_message(tid, posting_id, a.order, created_at),
            source_balance_after=format_amount(a.source_after),
            destination_balance_after=format_amount(a.destination_after),
        )
        for tid, a in zip(transfer_ids, applied, strict=True)
    )
    await _announce(conn, settings, posted, message)
    return posted


async def _post_bulk_credit(
    conn: asyncpg.Connection, settings: Settings, kind: str, source: AccountKey, orders: list[Order]
) -> Posted:
    """A payout: one source debited once, each destination credited as a pending transfer.

    Destinations are created if new (before the source is locked, in key order, like any
    posting) but neither locked nor rewritten; their pending credits count in every
    balance read and are folded into the balance by the next posting that locks the
    account, or by the background compaction.
    """
    destinations = [o.destination for o in orders]
    await _ensure_accounts(conn, destinations)
    locked = await _lock_accounts(conn, {source})
    source_id, balance = locked[source]
    rows = await conn.fetch(
        "SELECT a.id, a.owner FROM accounts a JOIN unnest($1::text[]) AS t(o) ON a.owner = t.o"
        " WHERE a.asset = $2 AND a.kind = $3",
        [d.owner for d in destinations],
        source.asset,
        Kind.FUNDING.value,
    )
    ids = {r["owner"]: r["id"] for r in rows}
    total = sum((o.amount for o in orders), Decimal(0))
    await conn.execute("UPDATE accounts SET balance = $2 WHERE id = $1", source_id, balance - total)
    posting_id, created_at, transfer_ids = await _insert_posting(
        conn, kind, orders, [source_id] * len(orders), [ids[d.owner] for d in destinations], pending=True
    )
    posted = Posted(posting_id, created_at, transfer_ids, orders)
    message = _event(kind, posted)
    credit = message.bulk_credit
    credit.asset = source.asset
    credit.source.CopyFrom(account_ref(source))
    credit.source_balance_after = format_amount(balance - total)
    credit.transfer_ids.extend(transfer_ids)
    credit.owners.extend(d.owner for d in destinations)
    credit.amounts.extend(format_amount(o.amount) for o in orders)
    if any(o.reference for o in orders):
        credit.references.extend(o.reference for o in orders)
    await _announce(conn, settings, posted, message)
    return posted


def _event(kind: str, posted: Posted) -> wallet_pb2.TransfersPosted:
    message = wallet_pb2.TransfersPosted(posting_id=str(posted.posting_id), posting_kind=kind)
    message.created_at.FromDatetime(posted.created_at)
    return message


async def _announce(conn: asyncpg.Connection, settings: Settings, posted: Posted, message: wallet_pb2.TransfersPosted) -> None:
    await outbox.enqueue(
        conn, settings, PRODUCER, posted.created_at, [outbox.Outgoing(TOPIC, str(posted.posting_id), message)]
    )


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


_WITH_PENDING = (
    "a.balance + coalesce((SELECT sum(t.amount) FROM transfers t WHERE t.pending AND t.destination_id = a.id), 0)"
)


async def balances(pool: asyncpg.Pool, owner: str, asset: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        f"SELECT a.owner, a.asset, a.kind, {_WITH_PENDING} AS balance FROM accounts a"
        " WHERE a.owner = $1 AND ($2 = '' OR a.asset = $2) ORDER BY a.asset, a.kind",
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
        f"SELECT asset, sum(b) AS total, count(*) AS accounts,"
        " count(*) FILTER (WHERE kind = ANY($1::text[]) AND b < 0) AS negative_user_accounts"
        f" FROM (SELECT a.asset, a.kind, {_WITH_PENDING} AS b FROM accounts a) AS s GROUP BY asset ORDER BY asset",
        [k.value for k in domain.USER_KINDS],
    )
