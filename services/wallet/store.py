"""Wallet persistence (asyncpg). Every function runs inside the caller's transaction.

Posting protocol (``post``): make sure the accounts exist, lock them in key order (no
deadlocks between concurrent postings, nor with the folder), fold the unfolded bulk
credits of the funding accounts among them, apply the orders with the pure domain rules,
write the new balances, the posting, its transfers and its outbox event. Set-based
statements (unnest arrays) keep a 10,000-transfer batch to a handful of round trips.

Bulk credits (``post_bulk_credit``) take no user account at all: the credits are stored
in columns, split by the owner's bucket (``bulk_credit_parts``), and count in every
balance read and lock from the moment they commit; the folder moves them into transfers
and balances later (``fold_bulk_credit``). See migrations/0002_bulk_credits.sql.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from services.kernel import outbox
from services.kernel.config import Settings
from services.kernel.errors import InsufficientFunds, InvalidArgument, NotFound
from services.kernel.money import MAX_INTEGER_DIGITS, format_amount
from services.wallet import domain
from services.wallet.domain import AccountKey, BulkCredit, HoldState, Kind, Order

from earn.v1 import wallet_pb2

PRODUCER = "wallet"
TOPIC = "wallet.transfers"


@dataclass(frozen=True, slots=True)
class Posted:
    posting_id: int
    created_at: datetime
    transfer_ids: list[int]  # empty for a bulk credit: its transfers get ids when folded


@dataclass(frozen=True, slots=True)
class BulkPosted:
    posting_id: int
    created_at: datetime
    total: Decimal
    source_balance_after: Decimal


def _sort_key(key: AccountKey) -> tuple[str, str, str]:
    """Key order: Python compares strings by code point, as PostgreSQL's "C" collation does."""
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


async def lock_accounts(conn: asyncpg.Connection, keys: set[AccountKey]) -> dict[AccountKey, tuple[int, Decimal]]:
    """Create and lock the accounts, then fold the unfolded bulk credits of the funding
    accounts among them; returns each one's id and balance.

    Every transaction locks accounts in key order (owner, asset, kind), so two never wait
    for each other in a cycle: postings here, the folder in ``fold_bulk_credit``."""
    await _ensure_accounts(conn, list(keys))
    ordered = sorted(keys, key=_sort_key)
    rows = await conn.fetch(
        "SELECT a.id, a.owner, a.asset, a.kind, a.balance FROM accounts a"
        " JOIN unnest($1::text[], $2::text[], $3::text[]) AS t(o, s, k)"
        "   ON a.owner = t.o AND a.asset = t.s AND a.kind = t.k"
        ' ORDER BY a.owner COLLATE "C", a.asset COLLATE "C", a.kind COLLATE "C" FOR UPDATE OF a',
        [k.owner for k in ordered],
        [k.asset for k in ordered],
        [k.kind.value for k in ordered],
    )
    funding = [r for r in rows if r["kind"] == Kind.FUNDING.value]
    folded = await _fold_credits_of(conn, funding) if funding else {}
    return {
        AccountKey(r["owner"], r["asset"], Kind(r["kind"])): (r["id"], folded.get(r["id"], r["balance"]))
        for r in rows
    }


# The bucket rows holding unfolded credits of the locked funding accounts ($1 owners,
# $2 assets), locked in key order: two postings that fold credits of the same bulk credit
# never wait for each other in a cycle. Rows of a bulk credit committed after this are
# left alone: that credit comes after the posting.
_LOCK_PARTS_OF = """
SELECT p.posting_id, p.bucket
FROM unnest($1::text[], $2::text[]) AS m(owner, asset)
JOIN bulk_credit_parts p ON p.bucket = owner_bucket(m.owner) AND p.asset = m.asset AND p.owners @> ARRAY[m.owner]
ORDER BY p.posting_id, p.bucket
FOR UPDATE OF p
"""

# Moves the credits of the locked accounts ($1 ids, $2 owners, $3 assets) out of the
# locked bucket rows ($4, $5) into transfers and balances.
_FOLD_CREDITS_OF = """
WITH hit AS (
    SELECT p.posting_id, p.bucket, m.id AS account_id, m.owner, p.amounts[i] AS amount,
           coalesce(p.refs[i], b.reference) AS reference, b.asset, b.source_id, b.created_at
    FROM unnest($1::bigint[], $2::text[], $3::text[]) AS m(id, owner, asset)
    JOIN bulk_credit_parts p ON p.bucket = owner_bucket(m.owner) AND p.asset = m.asset AND p.owners @> ARRAY[m.owner]
    CROSS JOIN LATERAL array_position(p.owners, m.owner) AS pos(i)
    JOIN bulk_credits b ON b.posting_id = p.posting_id
    WHERE (p.posting_id, p.bucket) IN (SELECT * FROM unnest($4::bigint[], $5::integer[]))
), taken AS (
    UPDATE bulk_credit_parts p SET
        owners = coalesce((SELECT array_agg(o ORDER BY n) FROM unnest(p.owners) WITH ORDINALITY AS u(o, n)
                           WHERE o <> ALL (h.owners)), '{}'),
        amounts = coalesce((SELECT array_agg(x ORDER BY n) FROM unnest(p.owners, p.amounts) WITH ORDINALITY AS u(o, x, n)
                            WHERE o <> ALL (h.owners)), '{}'),
        refs = CASE WHEN p.refs IS NOT NULL THEN
                   coalesce((SELECT array_agg(r ORDER BY n) FROM unnest(p.owners, p.refs) WITH ORDINALITY AS u(o, r, n)
                             WHERE o <> ALL (h.owners)), '{}') END,
        total = p.total - h.amount
    FROM (SELECT posting_id, bucket, array_agg(owner) AS owners, sum(amount) AS amount FROM hit GROUP BY posting_id, bucket) h
    WHERE p.posting_id = h.posting_id AND p.bucket = h.bucket
), history AS (
    INSERT INTO transfers (posting_id, asset, source_id, destination_id, amount, reference, created_at)
    SELECT posting_id, asset, source_id, account_id, amount, reference, created_at FROM hit ORDER BY posting_id, account_id
)
UPDATE accounts a SET balance = a.balance + s.amount
FROM (SELECT account_id, sum(amount) AS amount FROM hit GROUP BY account_id) s
WHERE a.id = s.account_id
RETURNING a.id, a.balance
"""


async def _fold_credits_of(conn: asyncpg.Connection, accounts: list[asyncpg.Record]) -> dict[int, Decimal]:
    """Fold the unfolded bulk credits of locked funding accounts (rows of id, owner, asset)
    into their history and balances; returns the new balances of those that had some.
    Runs after the accounts are locked, so it sees every fold that committed meanwhile."""
    owners, assets = [r["owner"] for r in accounts], [r["asset"] for r in accounts]
    parts = await conn.fetch(_LOCK_PARTS_OF, owners, assets)
    if not parts:
        return {}
    rows = await conn.fetch(
        _FOLD_CREDITS_OF, [r["id"] for r in accounts], owners, assets, [p[0] for p in parts], [p[1] for p in parts]
    )
    return {r["id"]: r["balance"] for r in rows}


# The new balances of the locked accounts ($8 ids, $9 balances), $10 postings and their
# transfers in one statement (one round trip, a prepared statement): $3..$7 and $11 hold
# one element per transfer, $11 the number (1 to $10) of its posting; postings and
# transfers take the next ids in the order given. Returns the posting ids and the
# transfer ids, each in that order.
_INSERT_POSTINGS = """
WITH balance AS (
    UPDATE accounts SET balance = t.b FROM unnest($8::bigint[], $9::numeric[]) AS t(i, b) WHERE id = t.i
), posting AS MATERIALIZED (
    SELECT n, nextval('postings_id_seq') AS id FROM generate_series(1, $10::integer) AS n ORDER BY n
), posted AS (
    INSERT INTO postings (id, kind, created_at) SELECT id, $1, $2 FROM posting
), item AS MATERIALIZED (
    SELECT nextval('transfers_id_seq') AS id, t.*
    FROM (
        SELECT * FROM unnest($3::text[], $4::bigint[], $5::bigint[], $6::numeric[], $7::text[], $11::integer[])
            WITH ORDINALITY AS u(asset, source_id, destination_id, amount, reference, p, n)
        ORDER BY n
    ) t
), inserted AS (
    INSERT INTO transfers (id, posting_id, asset, source_id, destination_id, amount, reference, created_at)
    SELECT item.id, posting.id, item.asset, item.source_id, item.destination_id, item.amount, item.reference, $2
    FROM item JOIN posting ON posting.n = item.p
)
SELECT (SELECT array_agg(id ORDER BY n) FROM posting), (SELECT array_agg(item.id ORDER BY item.n) FROM item)
"""


async def post(
    conn: asyncpg.Connection, settings: Settings, kind: str, orders: list[Order], *, holder: str = ""
) -> Posted:
    """Apply ``orders`` atomically as one posting and announce it on the outbox.

    A batch that is a bulk credit (``domain.as_bulk_credit``) is stored as one. The
    posting is stamped with the kernel clock (``settings.clock``: the wall clock, or
    EARN_CLOCK_FILE in tests). ``holder``: the service holding the funds, for hold
    postings (announced in TransfersPosted.holder)."""
    bulk = domain.as_bulk_credit(orders)
    if bulk is not None:
        posted = await post_bulk_credit(conn, settings, kind, bulk)
        return Posted(posted.posting_id, posted.created_at, [])
    (outcome,) = await post_many(conn, settings, kind, [orders], [holder])
    if isinstance(outcome, InsufficientFunds):
        raise outcome
    return outcome


async def post_many(
    conn: asyncpg.Connection, settings: Settings, kind: str, postings: list[list[Order]], holders: list[str]
) -> list[Posted | InsufficientFunds]:
    """Postings of ``kind`` (none a bulk credit) in one go (group commit), each atomic on
    its own, as if posted one after another in this order: one that would overdraw an
    account gets its InsufficientFunds and moves nothing (its accounts were created and
    their bulk credits folded, so a caller that must write nothing for it rolls back).
    Their accounts are locked once, their balances, postings and transfers written in
    one statement, and each posting announced with its own event (``holders[i]``: as
    ``post``'s ``holder``)."""
    if not postings:
        return []  # (a round of replays only: no account to create or lock)
    keys = {key for orders in postings for o in orders for key in (o.source, o.destination)}
    locked = await lock_accounts(conn, keys)
    current = {k: v[1] for k, v in locked.items()}
    outcomes: list[Posted | InsufficientFunds | None] = []
    accepted: list[tuple[int, list[Order], list[domain.Applied]]] = []
    for i, orders in enumerate(postings):
        mine = {key: current[key] for o in orders for key in (o.source, o.destination)}
        try:
            after, applied = domain.apply(mine, orders)
        except InsufficientFunds as refused:
            outcomes.append(refused)
            continue
        current.update(after)
        outcomes.append(None)
        accepted.append((i, orders, applied))
    if not accepted:
        return outcomes  # type: ignore[return-value]  # every posting refused
    ids = {k: v[0] for k, v in locked.items()}
    touched = {ids[k]: current[k] for k in current if current[k] != locked[k][1]}
    flat = [(n, o) for n, (_, orders, _) in enumerate(accepted, start=1) for o in orders]
    at = settings.clock.now()
    posting_ids, transfer_ids = await conn.fetchrow(
        _INSERT_POSTINGS,
        kind, at,
        [o.asset for _, o in flat], [ids[o.source] for _, o in flat], [ids[o.destination] for _, o in flat],
        [o.amount for _, o in flat], [o.reference for _, o in flat],
        list(touched), list(touched.values()), len(accepted), [n for n, _ in flat],
    )
    events: list[outbox.Outgoing] = []
    next_transfer = iter(transfer_ids)
    for posting_id, (i, orders, applied) in zip(posting_ids, accepted, strict=True):
        posted = outcomes[i] = Posted(posting_id, at, [next(next_transfer) for _ in orders])
        message = _event(kind, posted)
        message.holder = holders[i]
        message.transfers.extend(
            wallet_pb2.PostedTransfer(
                transfer=transfer_message(tid, posting_id, a.order, at),
                source_balance_after=format_amount(a.source_after),
                destination_balance_after=format_amount(a.destination_after),
            )
            for tid, a in zip(posted.transfer_ids, applied, strict=True)
        )
        events.append(outbox.Outgoing(TOPIC, str(posting_id), message))
    await outbox.enqueue(conn, settings, PRODUCER, at, events)
    return outcomes  # type: ignore[return-value]  # each posting decided above


# ---- bulk credits ----------------------------------------------------------------------

# The posting and its credits, split by bucket, from newline-joined columns (one text
# parameter per column: far cheaper to send than 5,000-element arrays). No lock is taken,
# so bulk credits from one source run this step in parallel.
_INSERT_BULK_CREDIT = """
WITH posting AS (
    INSERT INTO postings (kind, created_at) VALUES ($1, $6::timestamptz) RETURNING id, created_at
), credit AS (
    SELECT o, a::numeric AS a, r
    FROM unnest(string_to_array($3, E'\n'), string_to_array($4, E'\n'), string_to_array($5, E'\n')) AS c(o, a, r)
), parts AS (
    INSERT INTO bulk_credit_parts (posting_id, bucket, asset, owners, amounts, refs, total)
    SELECT posting.id, owner_bucket(o), $2, array_agg(o), array_agg(a), CASE WHEN $5 IS NOT NULL THEN array_agg(r) END, sum(a)
    FROM posting, credit GROUP BY posting.id, owner_bucket(o)
    RETURNING total
)
SELECT posting.id, posting.created_at, (SELECT sum(total) FROM parts) AS total FROM posting
"""

# The source, created if new, debited once by the total; its row stays locked until
# commit, so this runs as late as possible. Then the header row.
_DEBIT_BULK_SOURCE = """
WITH source AS (
    INSERT INTO accounts AS a (owner, asset, kind, may_go_negative, balance)
    VALUES ($2, $3, $4, $4 = ANY($9::text[]), -$5::numeric)
    ON CONFLICT (owner, asset, kind) DO UPDATE SET balance = a.balance - $5::numeric
    RETURNING id, balance
), header AS (
    INSERT INTO bulk_credits (posting_id, asset, source_id, credit_count, total, reference, created_at)
    SELECT $1, $3, source.id, $6, $5, $7, $8 FROM source
)
SELECT balance FROM source
"""


class BulkActivity:
    """When this process last posted a bulk credit (monotonic seconds): the folder lets
    a run of payouts finish before it competes with them for the database."""

    last: float = 0.0

    @classmethod
    def touch(cls) -> None:
        cls.last = time.monotonic()

    @classmethod
    def quiet_for(cls) -> float:
        return time.monotonic() - cls.last


async def post_bulk_credit(conn: asyncpg.Connection, settings: Settings, kind: str, bulk: BulkCredit) -> BulkPosted:
    """Post a bulk credit: the credits in columns, the source debited once, the event.

    The event's columns are built first: from the source's debit to the commit its row is
    locked, and payouts from that source wait."""
    BulkActivity.touch()
    message = wallet_pb2.TransfersPosted(posting_kind=kind)
    credit = message.bulk_credit
    credit.asset = bulk.asset
    credit.source.CopyFrom(account_ref(bulk.source))
    credit.owners.extend(bulk.owners)
    credit.amounts.extend(bulk.amounts)
    if bulk.references:
        credit.references.extend(bulk.references)
    else:
        credit.reference = bulk.reference
    try:
        posting_id, created_at, total = await conn.fetchrow(
            _INSERT_BULK_CREDIT,
            kind,
            bulk.asset,
            "\n".join(bulk.owners),
            "\n".join(bulk.amounts),
            "\n".join(bulk.references) if bulk.references else None,
            settings.clock.now(),
        )
        balance = await conn.fetchval(
            _DEBIT_BULK_SOURCE,
            posting_id,
            bulk.source.owner,
            bulk.asset,
            bulk.source.kind.value,
            total,
            len(bulk.owners),
            bulk.reference,
            created_at,
            [k.value for k in domain.MAY_GO_NEGATIVE],
        )
    except asyncpg.NumericValueOutOfRangeError:
        raise InvalidArgument(
            "amounts", f"their total, or the source's balance after it, exceeds the ledger's {MAX_INTEGER_DIGITS} integer digits"
        ) from None
    message.posting_id = str(posting_id)
    message.created_at.FromDatetime(created_at)
    credit.source_balance_after = format_amount(balance)
    await outbox.enqueue(conn, settings, PRODUCER, created_at, [outbox.Outgoing(TOPIC, str(posting_id), message)])
    return BulkPosted(posting_id, created_at, total, balance)


async def fold_bulk_credit(conn: asyncpg.Connection, posting_id: int | None = None) -> int:
    """Fold one bulk credit into per-user transfers and balances; call in a transaction.

    The oldest unfolded one that no one else is folding, or ``posting_id`` (waiting for
    whoever folds it). Creates the funding accounts that do not exist yet and locks them
    all, then writes the transfers and balances, deletes the parts and marks the bulk
    credit folded. One transaction: a crash leaves it either folded or not at all.
    Returns how many credits it folded (0: nothing to fold).
    """
    if posting_id is None:
        header = await conn.fetchrow(
            "SELECT posting_id, asset FROM bulk_credits WHERE folded_at IS NULL"
            " ORDER BY posting_id LIMIT 1 FOR UPDATE SKIP LOCKED"
        )
    else:
        header = await conn.fetchrow(
            "SELECT posting_id, asset FROM bulk_credits WHERE posting_id = $1 AND folded_at IS NULL FOR UPDATE", posting_id
        )
    if header is None:
        return 0
    posting_id, asset = header
    # Create the missing funding accounts and lock them all, in key order like every
    # posting; their ids come back so that nothing below depends on join planning over
    # accounts (whose statistics lag far behind after a first payout to new users).
    ids, owners = await conn.fetchrow(
        """
        WITH locked AS (
            INSERT INTO accounts AS a (owner, asset, kind, may_go_negative)
            SELECT o, $2, 'funding', false FROM bulk_credit_parts p, unnest(p.owners) AS o
            WHERE p.posting_id = $1 ORDER BY o COLLATE "C"
            ON CONFLICT (owner, asset, kind) DO UPDATE SET kind = excluded.kind  -- locks it
            RETURNING a.id, a.owner
        )
        SELECT coalesce(array_agg(id), '{}'), coalesce(array_agg(owner), '{}') FROM locked
        """,
        posting_id,
        asset,
    )
    # A new statement: it sees every credit that a posting folded early while this
    # waited for its account.
    folded = await conn.fetchval(
        """
        WITH credit AS (
            SELECT a.id AS account_id, c.amount, coalesce(c.ref, b.reference) AS reference, b.source_id, b.created_at
            FROM bulk_credits b
            JOIN bulk_credit_parts p ON p.posting_id = b.posting_id
            CROSS JOIN LATERAL unnest(p.owners, p.amounts, p.refs) AS c(owner, amount, ref)
            JOIN unnest($3::bigint[], $4::text[]) AS a(id, owner) ON a.owner = c.owner
            WHERE b.posting_id = $1
        ), history AS (
            INSERT INTO transfers (posting_id, asset, source_id, destination_id, amount, reference, created_at)
            SELECT $1, $2, source_id, account_id, amount, reference, created_at FROM credit
        ), balances AS (
            UPDATE accounts a SET balance = a.balance + credit.amount FROM credit
            WHERE a.id = credit.account_id AND a.id = ANY($3::bigint[])  -- the index path, whatever the estimates
        ), parts AS (
            DELETE FROM bulk_credit_parts WHERE posting_id = $1
        ), header AS (
            UPDATE bulk_credits SET folded_at = clock_timestamp() WHERE posting_id = $1
        )
        SELECT count(*) FROM credit
        """,
        posting_id,
        asset,
        ids,
        owners,
    )
    return folded


async def fold_next_bulk_credit(pool: asyncpg.Pool) -> int:
    """The background folder's step: fold the oldest unfolded bulk credit; 0 if none."""
    async with pool.acquire() as conn, conn.transaction():
        return await fold_bulk_credit(conn)


async def unfolded_assets(pool: asyncpg.Pool, owner: str) -> list[str]:
    """The assets in which ``owner`` has bulk credits not folded yet."""
    rows = await pool.fetch(
        "SELECT DISTINCT asset FROM bulk_credit_parts WHERE bucket = owner_bucket($1) AND owners @> ARRAY[$1]", owner
    )
    return [r["asset"] for r in rows]


async def unfolded_backlog(pool: asyncpg.Pool) -> tuple[int, int]:
    """Bulk credits (postings) not folded yet, and their credits."""
    row = await pool.fetchrow("SELECT count(*), coalesce(sum(credit_count), 0) FROM bulk_credits WHERE folded_at IS NULL")
    return row[0], row[1]


def _event(kind: str, posted: Posted) -> wallet_pb2.TransfersPosted:
    message = wallet_pb2.TransfersPosted(posting_id=str(posted.posting_id), posting_kind=kind)
    message.created_at.FromDatetime(posted.created_at)
    return message


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
_HOLD_COLUMNS_OF_H = ", ".join("h." + c.strip() for c in _HOLD_COLUMNS.split(","))  # the same, of a table aliased h


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


async def insert_holds(
    conn: asyncpg.Connection, holds: list[tuple[Order, str]], at: datetime
) -> list[asyncpg.Record]:
    """The holds of a batch of PlaceHolds (the order placing each and its holder), with
    ids in the order given; their rows in that order."""
    rows = await conn.fetch(
        "WITH hold AS MATERIALIZED (SELECT n, nextval('holds_id_seq') AS id FROM generate_series(1, cardinality($1::text[])) AS n ORDER BY n)"
        " INSERT INTO holds (id, owner, asset, holder, amount, remaining, reference, created_at, updated_at)"
        " SELECT hold.id, u.owner, u.asset, u.holder, u.amount, u.amount, u.reference, $6, $6"
        " FROM unnest($1::text[], $2::text[], $3::text[], $4::numeric[], $5::text[]) WITH ORDINALITY AS u(owner, asset, holder, amount, reference, n)"
        f" JOIN hold ON hold.n = u.n RETURNING {_HOLD_COLUMNS}",
        [o.source.owner for o, _ in holds], [o.asset for o, _ in holds], [h for _, h in holds], [o.amount for o, _ in holds],
        [o.reference for o, _ in holds], at,
    )
    return sorted(rows, key=lambda r: r["id"])


async def lock_holds(conn: asyncpg.Connection, hold_ids: list[int]) -> dict[int, HoldState]:
    """Lock holds (a release's or capture's), in id order; unknown ids are left out."""
    rows = await conn.fetch(
        "SELECT id, owner, asset, amount, remaining, holder FROM holds WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE", hold_ids
    )
    return {r["id"]: HoldState(r["id"], r["owner"], r["asset"], r["amount"], r["remaining"], r["holder"]) for r in rows}


async def reduce_holds(conn: asyncpg.Connection, takes: list[tuple[int, Decimal]], at: datetime) -> dict[int, asyncpg.Record]:
    """Take (hold id, amount) pairs off the holds' remaining (a hold may come more than
    once): each hold's row after all of them, by id."""
    rows = await conn.fetch(
        "UPDATE holds AS h SET remaining = h.remaining - t.total, updated_at = $3"
        " FROM (SELECT id, sum(amount) AS total FROM unnest($1::bigint[], $2::numeric[]) AS u(id, amount) GROUP BY id) AS t"
        f" WHERE h.id = t.id RETURNING {_HOLD_COLUMNS_OF_H}",
        [h for h, _ in takes], [a for _, a in takes], at,
    )
    return {r["id"]: r for r in rows}


async def get_hold(conn: asyncpg.Connection | asyncpg.Pool, hold_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(f"SELECT {_HOLD_COLUMNS} FROM holds WHERE id = $1", hold_id)
    if row is None:
        raise NotFound(f"hold_id: no hold {hold_id}")
    return row


# ---- queries -------------------------------------------------------------------------


async def balances(pool: asyncpg.Pool, owner: str, asset: str) -> list[asyncpg.Record]:
    """The owner's balances, each funding balance with its unfolded bulk credits (also
    where the folder has not created the account yet)."""
    return await pool.fetch(
        """
        WITH unfolded AS (
            SELECT p.asset, 'funding'::text AS kind, sum(p.amounts[array_position(p.owners, $1)]) AS amount
            FROM bulk_credit_parts p
            WHERE p.bucket = owner_bucket($1) AND p.owners @> ARRAY[$1] AND ($2 = '' OR p.asset = $2)
            GROUP BY p.asset
        )
        SELECT $1 AS owner, coalesce(a.asset, u.asset) AS asset, coalesce(a.kind, u.kind) AS kind,
               coalesce(a.balance, 0) + coalesce(u.amount, 0) AS balance
        FROM (SELECT asset, kind, balance FROM accounts WHERE owner = $1 AND ($2 = '' OR asset = $2)) AS a
        FULL JOIN unfolded u ON a.asset = u.asset AND a.kind = u.kind
        ORDER BY 2, 3
        """,
        owner, asset,
    )


async def fold_owner(pool: asyncpg.Pool, owner: str) -> None:
    """Fold the owner's unfolded bulk credits now (as a posting of theirs would), so that
    their history lists every credit with its transfer id."""
    assets = await unfolded_assets(pool, owner)
    if assets:
        async with pool.acquire() as conn, conn.transaction():
            await lock_accounts(conn, {AccountKey(owner, a, Kind.FUNDING) for a in assets})


async def fold_posting(pool: asyncpg.Pool, posting_id: int) -> None:
    """Fold the posting now if it is an unfolded bulk credit (for a listing of it)."""
    if await pool.fetchval("SELECT true FROM bulk_credits WHERE posting_id = $1 AND folded_at IS NULL", posting_id):
        async with pool.acquire() as conn, conn.transaction():
            await fold_bulk_credit(conn, posting_id)


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
    """Per asset: the sum of every balance with the unfolded bulk credits (one snapshot),
    the accounts that exist, and the user accounts below zero (unfolded credits only add)."""
    return await pool.fetch(
        "SELECT asset, sum(b) AS total, count(*) FILTER (WHERE account) AS accounts,"
        " count(*) FILTER (WHERE account AND kind = ANY($1::text[]) AND b < 0) AS negative_user_accounts"
        " FROM (SELECT asset, kind, balance AS b, true AS account FROM accounts"
        "       UNION ALL SELECT asset, 'funding', total, false FROM bulk_credit_parts) AS s"
        " GROUP BY asset ORDER BY asset",
        [k.value for k in domain.USER_KINDS],
    )
