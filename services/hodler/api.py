"""HODLer Airdrop gRPC servicer, the event consumer's apply step and the distribution.

- Writes validate the whole request first (bad input writes nothing), then run under
  their client idempotency key in one transaction. CreateAirdrop seeds each holder's
  PRE from the counted balances of the hold asset (``store.insert_airdrop``).
- Events (wallet.transfers, one TransfersPosted per posting): the posting's changes of
  counted holdings (funding; holds of holder "simple_earn") at its ``created_at`` are
  applied in one transaction with the inbox row (consumer, posting), so a redelivered
  posting counts nothing again; a posting that changes no counted holding writes
  nothing. The sums are commutative: arrival order does not matter.
- Distribution (``DistributeAirdrops``, called by the scheduler's job): refused while
  the consumer has not applied every wallet event published when the call began; then
  per ended airdrop, one transaction locks the airdrop, computes every reward exactly
  from the sums and records them (one row per (airdrop, user)), freezing the sums; the
  rewards are paid by wallet ``BulkCredit`` in chunks keyed by (airdrop, chunk) from the
  airdrop's reward account; each chunk's posting is recorded, then the airdrop is marked
  distributed. A call after a crash anywhere sends the same credits again, which the
  wallet answers from their keys: paid once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf.message import Message

from services.hodler import domain, metrics, store
from services.hodler.domain import Leg, Status
from services.kernel import deadletters, distribution, events, idempotency, inbox, paging
from services.kernel.clock import micros, unix_hour
from services.kernel.config import Settings
from services.kernel.distribution import WalletClient
from services.kernel.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from services.kernel.grpcserver import GATEWAY, OPERATOR, SERVICE, scoped_user
from services.kernel.ids import check_user_id
from services.kernel.money import format_amount, parse_decimal, scale_of

from earn.v1 import hodler_pb2 as hd, hodler_pb2_grpc, wallet_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "earn.v1.HodlerService"
WALLET_TOPIC = "wallet.transfers"
CONSUMER = "hodler.wallet"
POSTING_NAMESPACE = uuid.UUID("0b7f0c55-3f39-4d55-8a43-2f1f6a3e9d21")

_QUERY = frozenset({GATEWAY, OPERATOR, SERVICE})
ROLES = {
    f"{SERVICE_NAME}/{method}": roles
    for method, roles in {
        "CreateAirdrop": frozenset({OPERATOR}),
        "GetAirdrop": _QUERY,
        "ListAirdrops": _QUERY,
        "GetUserHolding": _QUERY,
        "ListHourlyAverages": _QUERY,
        "GetEstimate": _QUERY,
        "ListAirdropRewards": _QUERY,
        "DistributeAirdrops": frozenset({SERVICE}),
    }.items()
}

_STATUS = {
    hd.AIRDROP_STATUS_UPCOMING: Status.UPCOMING,
    hd.AIRDROP_STATUS_ACTIVE: Status.ACTIVE,
    hd.AIRDROP_STATUS_ENDED: Status.ENDED,
    hd.AIRDROP_STATUS_DISTRIBUTED: Status.DISTRIBUTED,
}
_STATUS_OUT = {v: k for k, v in _STATUS.items()}
_KIND = {wallet_pb2.ACCOUNT_KIND_FUNDING: "funding", wallet_pb2.ACCOUNT_KIND_HOLD: "hold"}

M = TypeVar("M", bound=Message)
EndOffsets = Callable[[], Awaitable[dict[int, int]]]


@dataclass(frozen=True, slots=True)
class Changes:
    """A posting as what it changes: its inbox key, time (microseconds) and the signed
    changes of counted holdings per (user, asset)."""

    key: str
    t_us: int
    changes: dict[tuple[str, str], Decimal]


def _stamp(message: Any, field: str, value: Any) -> None:
    if value is not None:
        getattr(message, field).FromDatetime(value)


class HodlerApi(hodler_pb2_grpc.HodlerServiceServicer):
    def __init__(
        self, pool: asyncpg.Pool, settings: Settings, wallet: WalletClient, end_offsets: EndOffsets, *, credit_chunk: int = 5000,
        crash_after_chunks: int = 0, settle_seconds: float = 600.0,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.wallet = wallet
        self.end_offsets = end_offsets
        self.credit_chunk = credit_chunk
        # Reward chunks keyed hd:reward:<airdrop>:<chunk> (tests: crash_after_chunks).
        self.payer = distribution.Distributor(
            pool, wallet, store.LEDGER, settings.clock.now, namespace="hd", key_prefix="reward", crash_after_chunks=crash_after_chunks,
        )
        self.settle_us = int(settle_seconds * 1_000_000)

    def now_us(self) -> int:
        return micros(self.settings.clock.now())

    # ---- messages ------------------------------------------------------------------

    async def _airdrop_message(self, conn: Any, row: asyncpg.Record) -> hd.Airdrop:
        state = domain.status(row["start_us"], row["end_us"], self.now_us(), row["distribution"])
        message = hd.Airdrop(
            airdrop_id=row["airdrop_id"], hold_asset=row["hold_asset"], reward_asset=row["reward_asset"], total=format_amount(row["total"]),
            start_hour=row["start_hour"], end_hour=row["end_hour"], min_average=format_amount(row["min_average"]),
            per_user_cap="" if row["per_user_cap"] is None else format_amount(row["per_user_cap"]), status=_STATUS_OUT[state],
            holders=await store.holders(conn, row["airdrop_id"]),
        )
        if row["distribution"] == "distributed":
            message.distributed = format_amount(row["paid"])
            message.winners = row["winners"]
        message.start_time.FromSeconds(row["start_hour"] * 3600)
        message.end_time.FromSeconds(row["end_hour"] * 3600)
        _stamp(message, "created_at", row["created_at"])
        return message

    # ---- operator ------------------------------------------------------------------

    async def CreateAirdrop(self, request: hd.CreateAirdropRequest, context: grpc.aio.ServicerContext) -> hd.CreateAirdropResponse:
        idempotency.check_key(request.idempotency_key)
        airdrop = domain.parse_airdrop(
            airdrop_id=request.airdrop_id, hold_asset=request.hold_asset, reward_asset=request.reward_asset, total=request.total,
            start_hour=request.start_hour, end_hour=request.end_hour, min_average=request.min_average, cap=request.per_user_cap,
            now_us=self.now_us(),
        )

        async def work(conn: asyncpg.Connection) -> hd.CreateAirdropResponse:
            if not await store.insert_airdrop(conn, airdrop, self.settings.clock.now()):
                raise AlreadyExists(f"airdrop_id: airdrop {airdrop.airdrop_id} already exists")
            row = await store.airdrop(conn, airdrop.airdrop_id)
            return hd.CreateAirdropResponse(airdrop=await self._airdrop_message(conn, row))

        return await idempotency.write_once(self.pool, method="CreateAirdrop", request=request, response_type=hd.CreateAirdropResponse, work=work)

    # ---- queries -------------------------------------------------------------------

    async def GetAirdrop(self, request: hd.GetAirdropRequest, context: grpc.aio.ServicerContext) -> hd.GetAirdropResponse:
        row = await store.airdrop(self.pool, domain.check_airdrop_id(request.airdrop_id))
        return hd.GetAirdropResponse(airdrop=await self._airdrop_message(self.pool, row))

    async def ListAirdrops(self, request: hd.ListAirdropsRequest, context: grpc.aio.ServicerContext) -> hd.ListAirdropsResponse:
        wanted = None
        if request.status:
            wanted = _STATUS.get(request.status)
            if wanted is None:
                raise InvalidArgument("status", f"unknown value {request.status}")
        size = paging.page_size(request.page_size)
        rows = await store.list_airdrops(self.pool, wanted, self.now_us(), paging.after(request.page_token, "a"), size + 1)
        response = hd.ListAirdropsResponse()
        for r in rows[:size]:
            response.airdrops.append(await self._airdrop_message(self.pool, r))
        if len(rows) > size:
            response.next_page_token = paging.token("a", rows[size - 1]["seq"])
        return response

    async def _per_unit(self, a: domain.Airdrop) -> tuple[Fraction, Fraction | None]:
        whole = domain.average(await store.airdrop_sums(self.pool, a.airdrop_id), a.start_us, a.end_us)
        return whole, domain.per_unit(a.total, whole)

    async def GetUserHolding(self, request: hd.GetUserHoldingRequest, context: grpc.aio.ServicerContext) -> hd.GetUserHoldingResponse:
        airdrop_id = domain.check_airdrop_id(request.airdrop_id)
        user = check_user_id(request.user_id)
        row = await store.airdrop(self.pool, airdrop_id)
        a = store.as_airdrop(row)
        avg = domain.average(await store.user_sums(self.pool, airdrop_id, user), a.start_us, a.end_us)
        counted = domain.counted_average(avg, a.min_average, a.cap)
        response = hd.GetUserHoldingResponse(
            airdrop_id=airdrop_id, user_id=user, balance=format_amount(await store.balance(self.pool, user, a.hold_asset)),
            projected_average=domain.display(avg), counted_average=domain.display(counted),
        )
        if row["distribution"] is not None:
            reward = await store.reward_of(self.pool, airdrop_id, user)
            response.estimated_reward = format_amount(reward["amount"]) if reward else "0"
        else:
            _, unit = await self._per_unit(a)
            estimate = Fraction(0) if unit is None else counted * unit
            response.estimated_reward = format_amount(domain.floor_to_scale(estimate, scale_of(a.reward_asset)))
        return response

    async def ListHourlyAverages(self, request: hd.ListHourlyAveragesRequest, context: grpc.aio.ServicerContext) -> hd.ListHourlyAveragesResponse:
        """Each whole hour's average from the window's start to the current hour (projected)
        or the end: PRE and the user's changes in the window, the three-sum formula per hour."""
        airdrop_id = domain.check_airdrop_id(request.airdrop_id)
        user = check_user_id(request.user_id)
        size = paging.page_size(request.page_size)
        after = paging.after(request.page_token, "h")
        a = store.as_airdrop(await store.airdrop(self.pool, airdrop_id))
        first = max(a.start_hour, after + 1)
        last = min(a.end_hour, unix_hour(self.settings.clock.now()) + 1)  # exclusive
        stop = min(last, first + size)
        response = hd.ListHourlyAveragesResponse()
        if first >= stop:
            return response
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            sums = await store.user_sums(conn, airdrop_id, user)
            before, changes = await store.window_changes(conn, airdrop_id, user, first * domain.HOUR_US, stop * domain.HOUR_US)
        hours = domain.hourly_averages(sums.pre + Fraction(before), [(t, Fraction(d)) for t, d in changes], first, stop)
        for hour, avg in hours:
            response.hours.add(hour=hour, average=domain.display(avg))
        if stop < last:
            response.next_page_token = paging.token("h", stop - 1)
        return response

    async def GetEstimate(self, request: hd.GetEstimateRequest, context: grpc.aio.ServicerContext) -> hd.GetEstimateResponse:
        airdrop_id = domain.check_airdrop_id(request.airdrop_id)
        a = store.as_airdrop(await store.airdrop(self.pool, airdrop_id))
        whole, unit = await self._per_unit(a)
        return hd.GetEstimateResponse(
            airdrop_id=airdrop_id, estimated_reward_per_unit="" if unit is None else domain.display(unit),
            total_projected_average=domain.display(whole),
        )

    async def ListAirdropRewards(self, request: hd.ListAirdropRewardsRequest, context: grpc.aio.ServicerContext) -> hd.ListAirdropRewardsResponse:
        user = scoped_user(request.user_id)
        airdrop_id = domain.check_airdrop_id(request.airdrop_id) if request.airdrop_id else ""
        size = paging.page_size(request.page_size)
        rows = await store.list_rewards(self.pool, user, airdrop_id, paging.after(request.page_token, "r"), size + 1)
        response = hd.ListAirdropRewardsResponse()
        for r in rows[:size]:
            record = response.rewards.add(
                reward_id=str(r["id"]), airdrop_id=r["airdrop_id"], user_id=r["user_id"], reward_asset=r["reward_asset"],
                counted_average=format_amount(r["counted_average"]), amount=format_amount(r["amount"]), posting_id=r["posting_id"] or "",
            )
            _stamp(record, "paid_at", r["paid_at"])
        if len(rows) > size:
            response.next_page_token = paging.token("r", rows[size - 1]["id"])
        return response

    # ---- the distribution (service role: the scheduler's hodler.distribution) -----

    async def DistributeAirdrops(self, request: hd.DistributeAirdropsRequest, context: grpc.aio.ServicerContext) -> hd.DistributeAirdropsResponse:
        job, period = distribution.check_run(request.job, request.period, request.boundary_hour, self.settings.clock.now())
        due = await store.due_airdrops(self.pool, request.boundary_hour, self.now_us() - self.settle_us)
        if any(r["distribution"] is None for r in due):
            await self.check_caught_up()
        for r in due:
            await self.distribute(r["airdrop_id"], job, period)
        response = hd.DistributeAirdropsResponse()
        for row in await distribution.finished(self.pool, store.LEDGER, job, period):
            response.airdrops.add(
                airdrop_id=row["airdrop_id"], reward_asset=row["reward_asset"], total=format_amount(row["total"]),
                paid=format_amount(row["paid"]), winners=row["winners"],
            )
        return response

    async def check_caught_up(self) -> None:
        """FAILED_PRECONDITION unless every wallet event published by now is applied."""
        try:
            ends = await self.end_offsets()
        except Exception as err:
            log.warning("wallet.transfers end offsets unreadable", exc_info=True)
            raise FailedPrecondition(f"{WALLET_TOPIC}: its end offsets cannot be read ({type(err).__name__}); call again") from None
        applied = await store.consumed(self.pool, WALLET_TOPIC)
        behind = sorted((p, applied.get(p, 0), end) for p, end in ends.items() if applied.get(p, 0) < end)
        if behind:
            p, at, end = behind[0]
            raise FailedPrecondition(
                f"{WALLET_TOPIC}: the event consumer has not caught up ({len(behind)} partition(s) behind; partition {p} applied up to"
                f" offset {at} of {end}); the distribution waits so that no holding of the window is missed; call again"
            )

    async def distribute(self, airdrop_id: str, job: str, period: str) -> None:
        """Record the airdrop's rewards once (freezing its sums), then pay what is unpaid."""

        async def record(conn: asyncpg.Connection, row: asyncpg.Record) -> None:
            a = store.as_airdrop(row)
            counted = {
                u: domain.counted_average(domain.average(s, a.start_us, a.end_us), a.min_average, a.cap)
                for u, s in (await store.all_sums(conn, airdrop_id)).items()
            }
            counted = {u: c for u, c in counted.items() if c > 0}
            rewards = domain.split(counted, a.total, scale_of(a.reward_asset))
            assert sum(rewards.values(), Decimal(0)) <= a.total
            averages = {u: domain.floor_to_scale(c, 18) for u, c in counted.items()}
            await store.record_rewards(conn, airdrop_id, rewards, averages, self.credit_chunk, job, period)
            log.info("hodler rewards recorded", extra={"airdrop": airdrop_id, "recipients": len(rewards), "job": job, "period": period})

        paid = await self.payer.distribute(airdrop_id, record, source_owner=domain.reward_account(airdrop_id), reference=f"hodler:reward:{airdrop_id}")
        if paid is not None:
            metrics.AIRDROPS_DISTRIBUTED.inc()
            metrics.amount(metrics.REWARDS_PAID, paid["reward_asset"], paid["paid"])

    # ---- events (the consumer of wallet.transfers) ----------------------------------

    @staticmethod
    def parse_posting(raw: bytes) -> Changes | None:
        """A TransfersPosted (in the outbox's envelope) as its changes of counted holdings;
        None when it changes none (or the record is of another type).
        An unreadable or invalid record raises (DecodeError, ValueError, InvalidArgument)."""
        env = events.parse(raw)
        if env.type != wallet_pb2.TransfersPosted.DESCRIPTOR.full_name:
            return None
        event = events.unwrap(env, wallet_pb2.TransfersPosted)
        if not event.posting_id:
            raise InvalidArgument("posting_id", "is required")
        if not event.HasField("created_at"):
            raise InvalidArgument("created_at", "is required")
        legs: list[Leg] = []
        if event.HasField("bulk_credit"):
            b = event.bulk_credit
            if len(b.owners) != len(b.amounts):
                raise InvalidArgument("bulk_credit.amounts", "must have one amount per owner")
            scale = scale_of(b.asset, "bulk_credit.asset")
            legs.extend(
                Leg(o, b.asset, "funding", parse_decimal(a, f"bulk_credit.amounts[{i}]", scale=scale))
                for i, (o, a) in enumerate(zip(b.owners, b.amounts, strict=True))
            )
        for i, posted in enumerate(event.transfers):
            t = posted.transfer
            amount = parse_decimal(t.amount, f"transfers[{i}].amount", scale=scale_of(t.asset, f"transfers[{i}].asset"))
            legs.append(Leg(t.source.owner, t.asset, _KIND.get(t.source.kind, "other"), -amount))
            legs.append(Leg(t.destination.owner, t.asset, _KIND.get(t.destination.kind, "other"), amount))
        changes = domain.counted_changes(legs, event.holder)
        if not changes:
            return None
        t_us = event.created_at.seconds * 1_000_000 + event.created_at.nanos // 1000
        return Changes(str(uuid.uuid5(POSTING_NAMESPACE, f"{WALLET_TOPIC}:{event.posting_id}")), t_us, changes)

    async def apply(self, parsed: Changes) -> str:
        """One transaction: the inbox row, the balances, the open airdrops' sums.
        "applied" or "duplicate"."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await inbox.first_time(conn, CONSUMER, parsed.key):
                return "duplicate"
            late = await store.apply_changes(conn, parsed.changes, parsed.t_us)
        if late:
            metrics.LATE_CHANGES.inc()
            log.warning("wallet posting stamped inside the window of %d airdrop(s) already being paid: not counted in them", late,
                        extra={"key": parsed.key, "t_us": parsed.t_us})
        return "applied"

    async def advance(self, offsets: dict[int, int]) -> None:
        await store.advance(self.pool, WALLET_TOPIC, offsets)

    async def park(self, topic: str, partition: int, offset: int, error: str, raw: bytes) -> None:
        await deadletters.park(self.pool, topic, partition, offset, error, raw)

    async def refresh_gauges(self) -> None:
        for state, count in (await store.count_by_status(self.pool, self.now_us())).items():
            metrics.AIRDROPS.labels(state.value).set(count)
