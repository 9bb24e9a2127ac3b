"""Chunked distributions: recorded amounts paid by wallet ``BulkCredit``, a chunk a call.

A service that pays many users at once (CandyDrop's prizes, HODLer's airdrop rewards)
runs a scheduler job (checked by :func:`check_run`) that hands each due parent (campaign,
airdrop) to :meth:`Distributor.distribute`: in one transaction that locks the parent's
row, the service's own step records every amount, one row per (parent, user) with the
chunk it belongs to (:func:`chunk_numbers`), and marks the parent 'distributing'. Then
:meth:`Distributor.pay` sends every chunk not paid yet as one ``BulkCredit`` from the
parent's expense account, keyed by (parent, chunk) (``idempotency.derived_key``),
records the chunk's posting id, and marks the parent 'distributed'. A call after a crash anywhere
sends the same credits again under the same keys, which the wallet answers from its
idempotency table: paid once. The keys of a service never change (a running system
re-pays nothing after an upgrade). The job's answer lists the run's parents
(:func:`finished`), refused while a concurrent call still pays one.

The SQL names its tables and key column through a :class:`Ledger`, a module constant of
the calling service's store whose names are checked against the identifier grammar; every
value travels as a ``$n`` parameter. The tables: the parent (``<key>`` primary key,
``distribution`` NULL / 'distributing' / 'distributed', ``distributed_at``, ``job``,
``period``, ``paid``, the asset column) and the records (``<key>``, ``user_id``, ``amount``, ``chunk``,
``posting_id``, ``paid_at``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

import asyncpg
import grpc

from services.kernel.clock import unix_hour
from services.kernel.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound
from services.kernel.idempotency import derived_key
from services.kernel.ids import check_job, check_period
from services.kernel.money import format_amount
from services.kernel.peers import Peer

from earn.v1 import wallet_pb2, wallet_pb2_grpc

log = logging.getLogger(__name__)

Conn = asyncpg.Connection | asyncpg.Pool
Credits = list[tuple[str, Decimal]]
Recorder = Callable[[asyncpg.Connection, asyncpg.Record], Awaitable[None]]

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True, slots=True)
class Ledger:
    """Where a service records a distribution: the parent table and its key column
    (one row per campaign / airdrop), the records table (one row per user) and the
    parent's asset column."""

    parent: str
    key: str
    records: str
    asset: str  # the parent's column naming the asset paid

    def __post_init__(self) -> None:
        for name in (self.parent, self.key, self.records, self.asset):
            if not _IDENTIFIER.fullmatch(name):
                raise ValueError(f"distribution ledger: {name!r} is not a plain SQL identifier")

    @property
    def noun(self) -> str:
        """What one parent is called in messages: its key column less ``_id``."""
        return self.key.removesuffix("_id")


class WalletClient(Peer):
    """The wallet of a distribution; whatever it refuses is a failed precondition."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        super().__init__(wallet_pb2_grpc.WalletServiceStub(channel), token, "wallet", retry="the distribution resumes when called again")

    def refused(self, method: str, err: grpc.aio.AioRpcError) -> DomainError:
        log.error("wallet call failed", extra={"method": method, "code": err.code().name, "details": err.details()})
        return FailedPrecondition(f"wallet refused {method}: {err.details()}")


# ---- pure parts -----------------------------------------------------------------------


def chunk_numbers(count: int, chunk_size: int) -> list[int]:
    """The chunk of each of ``count`` records in order: ``chunk_size`` records a chunk."""
    return [i // chunk_size for i in range(count)]


def check_run(job: str, period: str, boundary_hour: int, now: datetime) -> tuple[str, str]:
    """A distribution job's run as the scheduler asks for it: the checked job and period;
    the boundary a positive unix hour, not after the current one."""
    job, period = check_job(job), check_period(period)
    if boundary_hour <= 0:
        raise InvalidArgument("boundary_hour", "must be a positive unix hour")
    if boundary_hour > unix_hour(now):
        raise FailedPrecondition(f"boundary_hour: {boundary_hour} is after the current hour")
    return job, period


def credit_request(key: str, asset: str, source_owner: str, reference: str, credits: Sequence[tuple[str, Decimal]]) -> wallet_pb2.BulkCreditRequest:
    """One chunk's ``BulkCredit``: from ``source_owner``'s expense account to each owner."""
    credit = wallet_pb2.BulkCreditRequest(
        idempotency_key=key, asset=asset, source=wallet_pb2.AccountRef(owner=source_owner, kind=wallet_pb2.ACCOUNT_KIND_EXPENSE),
        reference=reference,
    )
    credit.owners.extend(u for u, _ in credits)
    credit.amounts.extend(format_amount(a) for _, a in credits)
    return credit


# ---- SQL --------------------------------------------------------------------------------


async def parent_row(conn: Conn, ledger: Ledger, parent_id: str, *, lock: bool = False) -> asyncpg.Record:
    """The parent's row (``FOR UPDATE`` with ``lock``); NOT_FOUND when there is none."""
    row = await conn.fetchrow(f"SELECT * FROM {ledger.parent} WHERE {ledger.key} = $1" + (" FOR UPDATE" if lock else ""), parent_id)
    if row is None:
        raise NotFound(f"{ledger.key}: no {ledger.noun} {parent_id}")
    return row


async def unpaid_chunks(conn: Conn, ledger: Ledger, parent_id: str) -> dict[int, Credits]:
    """The records with an amount and no posting yet, per chunk, users in order."""
    out: dict[int, Credits] = defaultdict(list)
    for r in await conn.fetch(
        f"SELECT chunk, user_id, amount FROM {ledger.records} WHERE {ledger.key} = $1 AND amount > 0 AND posting_id IS NULL"
        " ORDER BY chunk, user_id",
        parent_id,
    ):
        out[r["chunk"]].append((r["user_id"], r["amount"]))
    return dict(out)


async def chunk_paid(conn: Conn, ledger: Ledger, parent_id: str, chunk: int, posting_id: str, at: datetime) -> None:
    await conn.execute(
        f"UPDATE {ledger.records} SET posting_id = $3, paid_at = $4 WHERE {ledger.key} = $1 AND chunk = $2 AND amount > 0 AND posting_id IS NULL",
        parent_id, chunk, posting_id, at,
    )


async def mark_distributed(conn: Conn, ledger: Ledger, parent_id: str, at: datetime) -> bool:
    """'distributing' -> 'distributed'; True for the call that made the change."""
    done = await conn.fetchval(
        f"UPDATE {ledger.parent} SET distribution = 'distributed', distributed_at = $2 WHERE {ledger.key} = $1 AND distribution = 'distributing'"
        " RETURNING true",
        parent_id, at,
    )
    return bool(done)


async def distributed_by(conn: Conn, ledger: Ledger, job: str, period: str) -> list[asyncpg.Record]:
    """The parents whose amounts a job's run (job, period) recorded."""
    return list(await conn.fetch(f"SELECT * FROM {ledger.parent} WHERE job = $1 AND period = $2 ORDER BY {ledger.key}", job, period))


async def finished(conn: Conn, ledger: Ledger, job: str, period: str) -> list[asyncpg.Record]:
    """The parents a run (job, period) distributed, every one paid: FAILED_PRECONDITION
    while one is still being paid by a concurrent call."""
    rows = await distributed_by(conn, ledger, job, period)
    for row in rows:
        if row["distribution"] != "distributed":
            raise FailedPrecondition(f"{ledger.key}: {ledger.noun} {row[ledger.key]} is still being paid; call again")
    return rows


# ---- paying -----------------------------------------------------------------------------


@dataclass(slots=True)
class Distributor:
    """Pays a service's recorded distributions: chunks keyed
    ``<namespace>:<key_prefix>:<parent>:<chunk>`` (one per process: it counts the chunks
    paid). Tests only: ``crash_after_chunks`` SIGKILLs this process once the wallet paid
    that many chunks, before they are recorded (the worst moment for a crash). 0: never."""

    pool: asyncpg.Pool
    wallet: Peer
    ledger: Ledger
    now: Callable[[], datetime]
    namespace: str
    key_prefix: str
    crash_after_chunks: int = 0
    chunks_paid: int = field(default=0, init=False)

    async def distribute(self, parent_id: str, record: Recorder, *, source_owner: str, reference: str) -> asyncpg.Record | None:
        """Record the parent's amounts once, then pay what is unpaid. In one transaction
        that locks the parent's row: ``record(conn, row)`` when it has no distribution yet
        (it records the amounts and marks the parent 'distributing'), nothing more when it
        is distributed. Then :meth:`pay`. The parent's row (asset, paid total) when this
        call marked it distributed, else None."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await parent_row(conn, self.ledger, parent_id, lock=True)
            if row["distribution"] is None:
                await record(conn, row)
            elif row["distribution"] == "distributed":
                return None
        row = await parent_row(self.pool, self.ledger, parent_id)
        paid = await self.pay(parent_id, asset=row[self.ledger.asset], source_owner=source_owner, reference=reference)
        return row if paid else None

    def key(self, parent_id: str, chunk: int) -> str:
        return derived_key(self.namespace, self.key_prefix, parent_id, chunk)

    async def pay(self, parent_id: str, *, asset: str, source_owner: str, reference: str) -> bool:
        """Pay every unpaid chunk of ``parent_id``, record each chunk's posting, then mark
        the parent distributed. True for the call that marked it (count it once)."""
        for chunk, credits in sorted((await unpaid_chunks(self.pool, self.ledger, parent_id)).items()):
            reply = await self.wallet.call("BulkCredit", credit_request(self.key(parent_id, chunk), asset, source_owner, reference, credits))
            self.chunks_paid += 1
            if self.crash_after_chunks and self.chunks_paid >= self.crash_after_chunks:
                log.warning("crash_after_chunks reached: SIGKILL (a test of the distribution's recovery)")
                os.kill(os.getpid(), signal.SIGKILL)
            await chunk_paid(self.pool, self.ledger, parent_id, chunk, reply.posting_id, self.now())
        return await mark_distributed(self.pool, self.ledger, parent_id, self.now())
