"""CandyDrop gRPC servicer, the event consumer's apply step and the distribution.

- Writes validate the whole request first (bad input writes nothing), then run under
  their client idempotency key in one transaction.
- Events: a record that counts is applied in one transaction with its inbox row
  (consumer, event id), so a redelivered event counts nothing again; one that counts for
  nothing writes nothing (``_apply``). Exchange events are deduplicated by
  the exchange's own event id (stable when the exchange delivers a fact again), mapped
  to a UUID with uuid5; Simple Earn's by their envelope's event id.
- Distribution (``DistributePrizes``, called by the scheduler's job): per ended campaign,
  one transaction locks the campaign, computes every prize exactly from the progress and
  records the prizes (one row per (campaign, user)), freezing the counts; then the prizes
  are paid by wallet ``BulkCredit`` in chunks keyed by (campaign, chunk) from the
  campaign's prize account; each chunk's posting is recorded, then the campaign is marked
  distributed. A call after a crash anywhere sends the same credits again, which the
  wallet answers from their keys: paid once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf.message import Message

from services.candydrop import domain, metrics, store
from services.candydrop.domain import PoolKind, Status, TaskKind
from services.kernel import deadletters, distribution, events, idempotency, inbox, paging
from services.kernel.clock import full_hour_field, unix_hour
from services.kernel.config import Settings
from services.kernel.distribution import WalletClient
from services.kernel.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from services.kernel.grpcserver import GATEWAY, OPERATOR, SERVICE, scoped_user
from services.kernel.money import format_amount, parse_amount, parse_decimal, scale_of

from earn.v1 import accrual_pb2, candydrop_pb2 as cd, candydrop_pb2_grpc, exchange_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "earn.v1.CandyDropService"
EXCHANGE_NAMESPACE = uuid.UUID("6f1c1d8e-3b0a-4b8e-9a55-6b7c2c0d6a10")

_QUERY = frozenset({GATEWAY, OPERATOR, SERVICE})
ROLES = {
    f"{SERVICE_NAME}/{method}": roles
    for method, roles in {
        "CreateCampaign": frozenset({OPERATOR}),
        "Register": frozenset({GATEWAY}),
        "GetCampaign": _QUERY,
        "ListCampaigns": _QUERY,
        "GetProgress": _QUERY,
        "ListPrizes": _QUERY,
        "DistributePrizes": frozenset({SERVICE}),
    }.items()
}

_TASK_KIND = {
    cd.CANDY_TASK_KIND_SPOT_VOLUME: TaskKind.SPOT_VOLUME,
    cd.CANDY_TASK_KIND_FUTURES_VOLUME: TaskKind.FUTURES_VOLUME,
    cd.CANDY_TASK_KIND_DEPOSIT: TaskKind.DEPOSIT,
    cd.CANDY_TASK_KIND_FIRST_DEPOSIT: TaskKind.FIRST_DEPOSIT,
    cd.CANDY_TASK_KIND_SIMPLE_EARN_SUBSCRIPTION: TaskKind.SIMPLE_EARN_SUBSCRIPTION,
}
_TASK_KIND_OUT = {v: k for k, v in _TASK_KIND.items()}
_POOL_KIND = {cd.PRIZE_POOL_KIND_PRO_RATA: PoolKind.PRO_RATA, cd.PRIZE_POOL_KIND_FIXED_PER_CANDY: PoolKind.FIXED_PER_CANDY}
_POOL_KIND_OUT = {v: k for k, v in _POOL_KIND.items()}
_STATUS = {
    cd.CAMPAIGN_STATUS_UPCOMING: Status.UPCOMING,
    cd.CAMPAIGN_STATUS_ACTIVE: Status.ACTIVE,
    cd.CAMPAIGN_STATUS_ENDED: Status.ENDED,
    cd.CAMPAIGN_STATUS_DISTRIBUTING: Status.DISTRIBUTING,
    cd.CAMPAIGN_STATUS_DISTRIBUTED: Status.DISTRIBUTED,
}
_STATUS_OUT = {v: k for k, v in _STATUS.items()}

M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class Counted:
    """A consumed event as what it may count: its inbox consumer and key, user and facts."""

    consumer: str
    key: str
    user: str
    facts: list[domain.Fact]


def _stamp(message: Any, field: str, value: datetime | None) -> None:
    if value is not None:
        getattr(message, field).FromDatetime(value)


class CandyDropApi(candydrop_pb2_grpc.CandyDropServiceServicer):
    def __init__(
        self, pool: asyncpg.Pool, settings: Settings, wallet: WalletClient, *, credit_chunk: int = 5000, crash_after_chunks: int = 0,
        settle_seconds: float = 0.0,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.wallet = wallet
        self.credit_chunk = credit_chunk
        # A campaign is distributed only this long after its end (late exchange events
        # still count until then); the first run of the job after that pays it.
        self.settle = timedelta(seconds=settle_seconds)
        # Prize chunks keyed cd:prize:<campaign>:<chunk> (tests: crash_after_chunks).
        self.payer = distribution.Distributor(
            pool, wallet, store.LEDGER, settings.clock.now, namespace="cd", key_prefix="prize", crash_after_chunks=crash_after_chunks,
        )

    async def _write(self, method: str, request: Message, response_type: type[M], work: Callable[[asyncpg.Connection], Awaitable[M]]) -> M:
        return await idempotency.write_once(self.pool, method=method, request=request, response_type=response_type, work=work)

    # ---- messages ------------------------------------------------------------------

    async def _campaign_message(self, conn: Any, row: asyncpg.Record, tasks: list[domain.Task]) -> cd.Campaign:
        now = self.settings.clock.now()
        state = domain.status(row["start_at"], row["end_at"], now, row["distribution"])
        kind = PoolKind(row["pool_kind"])
        message = cd.Campaign(
            campaign_id=row["campaign_id"], prize_asset=row["prize_asset"], prize_pool=format_amount(row["prize_pool"]),
            pool_kind=_POOL_KIND_OUT[kind], prize_per_candy="" if row["prize_per_candy"] is None else format_amount(row["prize_per_candy"]),
            per_user_cap="" if row["per_user_cap"] is None else format_amount(row["per_user_cap"]), status=_STATUS_OUT[state],
            participants=await store.participants(conn, row["campaign_id"]),
        )
        for t in tasks:
            message.tasks.add(
                task_id=t.task_id, kind=_TASK_KIND_OUT[t.kind], asset=t.asset, threshold="" if t.threshold is None else format_amount(t.threshold),
                candies=t.candies, max_completions=t.max_completions,
            )
        if row["total_candies"] is not None:
            total = row["total_candies"]
        else:
            total = sum(store.candies_by_user(tasks, await store.progress_rows(conn, row["campaign_id"])).values())
        message.total_candies = total
        value = domain.value_per_candy(kind=kind, pool=row["prize_pool"], per_candy=row["prize_per_candy"], total_candies=total)
        message.estimated_value_per_candy = "" if value is None else domain.display(value)
        if row["distribution"] is not None:
            message.distributed = format_amount(row["paid"])
            message.winners = row["winners"]
        _stamp(message, "start_time", row["start_at"])
        _stamp(message, "end_time", row["end_at"])
        _stamp(message, "created_at", row["created_at"])
        return message

    # ---- operator ------------------------------------------------------------------

    async def CreateCampaign(self, request: cd.CreateCampaignRequest, context: grpc.aio.ServicerContext) -> cd.CreateCampaignResponse:
        idempotency.check_key(request.idempotency_key)
        campaign_id = domain.check_campaign_id(request.campaign_id)
        if not request.prize_asset:
            raise InvalidArgument("prize_asset", "is required")
        scale_of(request.prize_asset, "prize_asset")
        kind = _POOL_KIND.get(request.pool_kind)
        if request.pool_kind and kind is None:
            raise InvalidArgument("pool_kind", f"unknown value {request.pool_kind}")
        pool, per_candy, cap = domain.check_pool(
            prize_asset=request.prize_asset, pool=request.prize_pool, kind=kind, per_candy=request.prize_per_candy, cap=request.per_user_cap,
        )
        start, end = full_hour_field(request, "start_time"), full_hour_field(request, "end_time")
        now_hour = unix_hour(self.settings.clock.now())
        domain.check_window(unix_hour(start), unix_hour(end), now_hour)
        if unix_hour(start) < now_hour:
            raise InvalidArgument("start_time", "must not be before the current hour")
        if len(request.tasks) > domain.MAX_TASKS:
            raise InvalidArgument("tasks", f"at most {domain.MAX_TASKS} tasks")
        tasks = []
        for i, t in enumerate(request.tasks):
            task_kind = _TASK_KIND.get(t.kind)
            if t.kind and task_kind is None:
                raise InvalidArgument(f"tasks[{i}].kind", f"unknown value {t.kind}")
            tasks.append(domain.parse_task(
                task_id=t.task_id, kind=task_kind, asset=t.asset, threshold=t.threshold, candies=t.candies,
                max_completions=t.max_completions, field=f"tasks[{i}]",
            ))
        domain.check_tasks(tasks)
        campaign = domain.Campaign(campaign_id, request.prize_asset, pool, kind, per_candy, cap, start, end, tuple(tasks))  # type: ignore[arg-type]

        async def work(conn: asyncpg.Connection) -> cd.CreateCampaignResponse:
            if not await store.insert_campaign(conn, campaign, unix_hour(end), self.settings.clock.now()):
                raise AlreadyExists(f"campaign_id: campaign {campaign_id} already exists")
            row = await store.campaign(conn, campaign_id)
            return cd.CreateCampaignResponse(campaign=await self._campaign_message(conn, row, tasks))

        return await self._write("CreateCampaign", request, cd.CreateCampaignResponse, work)

    # ---- users ---------------------------------------------------------------------

    async def Register(self, request: cd.RegisterRequest, context: grpc.aio.ServicerContext) -> cd.RegisterResponse:
        idempotency.check_key(request.idempotency_key)
        user = domain.check_user_id(request.user_id)
        campaign_id = domain.check_campaign_id(request.campaign_id)
        row = await store.campaign(self.pool, campaign_id)
        at = self.settings.clock.now()
        if row["distribution"] is not None or at >= row["end_at"]:
            raise FailedPrecondition(f"campaign_id: campaign {campaign_id} has ended")

        async def work(conn: asyncpg.Connection) -> cd.RegisterResponse:
            locked = await store.campaign(conn, campaign_id, lock=False)
            if locked["distribution"] is not None:
                raise FailedPrecondition(f"campaign_id: campaign {campaign_id} has ended")
            registered = await store.register(conn, campaign_id, user, at)
            response = cd.RegisterResponse(campaign_id=campaign_id, user_id=user)
            response.registered_at.FromDatetime(registered)
            return response

        response = await self._write("Register", request, cd.RegisterResponse, work)
        metrics.REGISTRATIONS.inc()
        return response

    # ---- queries -------------------------------------------------------------------

    async def GetCampaign(self, request: cd.GetCampaignRequest, context: grpc.aio.ServicerContext) -> cd.GetCampaignResponse:
        campaign_id = domain.check_campaign_id(request.campaign_id)
        row = await store.campaign(self.pool, campaign_id)
        tasks = (await store.tasks_of(self.pool, [campaign_id]))[campaign_id]
        return cd.GetCampaignResponse(campaign=await self._campaign_message(self.pool, row, tasks))

    async def ListCampaigns(self, request: cd.ListCampaignsRequest, context: grpc.aio.ServicerContext) -> cd.ListCampaignsResponse:
        wanted = None
        if request.status:
            wanted = _STATUS.get(request.status)
            if wanted is None:
                raise InvalidArgument("status", f"unknown value {request.status}")
        size = paging.page_size(request.page_size)
        rows = await store.list_campaigns(self.pool, wanted, self.settings.clock.now(), paging.after(request.page_token, "c"), size + 1)
        tasks = await store.tasks_of(self.pool, [r["campaign_id"] for r in rows[:size]])
        response = cd.ListCampaignsResponse()
        for r in rows[:size]:
            response.campaigns.append(await self._campaign_message(self.pool, r, tasks[r["campaign_id"]]))
        if len(rows) > size:
            response.next_page_token = paging.token("c", rows[size - 1]["seq"])
        return response

    async def GetProgress(self, request: cd.GetProgressRequest, context: grpc.aio.ServicerContext) -> cd.GetProgressResponse:
        campaign_id = domain.check_campaign_id(request.campaign_id)
        user = domain.check_user_id(request.user_id)
        row = await store.campaign(self.pool, campaign_id)
        tasks = (await store.tasks_of(self.pool, [campaign_id]))[campaign_id]
        response = cd.GetProgressResponse(campaign_id=campaign_id, user_id=user)
        registered = await store.registration(self.pool, campaign_id, user)
        response.registered = registered is not None
        _stamp(response, "registered_at", registered)
        all_rows = await store.progress_rows(self.pool, campaign_id)
        mine = {r["task_id"]: r["amount"] for r in all_rows if r["user_id"] == user}
        for t in tasks:
            amount = mine.get(t.task_id, Decimal(0))
            response.tasks.add(
                task_id=t.task_id, kind=_TASK_KIND_OUT[t.kind], asset=t.asset, progress=format_amount(amount),
                completions=domain.completions(t, amount), max_completions=t.max_completions, candies=domain.candies(t, amount),
            )
        by_user = store.candies_by_user(tasks, all_rows)
        response.candies = by_user.get(user, 0)
        kind = PoolKind(row["pool_kind"])
        total = row["total_candies"] if row["total_candies"] is not None else sum(by_user.values())
        value = domain.value_per_candy(kind=kind, pool=row["prize_pool"], per_candy=row["prize_per_candy"], total_candies=total)
        response.estimated_value_per_candy = "" if value is None else domain.display(value)
        if row["distribution"] is not None:
            prize = await store.prize_of(self.pool, campaign_id, user)
            response.estimated_prize = format_amount(prize["amount"]) if prize else "0"
        else:
            prizes = domain.prizes(
                kind=kind, pool=row["prize_pool"], per_candy=row["prize_per_candy"], cap=row["per_user_cap"], candies=by_user,
                scale=scale_of(row["prize_asset"]),
            )
            response.estimated_prize = format_amount(prizes.get(user, Decimal(0)))
        return response

    async def ListPrizes(self, request: cd.ListPrizesRequest, context: grpc.aio.ServicerContext) -> cd.ListPrizesResponse:
        user = scoped_user(request.user_id)
        campaign_id = domain.check_campaign_id(request.campaign_id) if request.campaign_id else ""
        size = paging.page_size(request.page_size)
        rows = await store.list_prizes(self.pool, user, campaign_id, paging.after(request.page_token, "p"), size + 1)
        response = cd.ListPrizesResponse()
        for r in rows[:size]:
            record = response.prizes.add(
                prize_id=str(r["id"]), campaign_id=r["campaign_id"], user_id=r["user_id"], candies=r["candies"], prize_asset=r["prize_asset"],
                amount=format_amount(r["amount"]), posting_id=r["posting_id"] or "",
            )
            _stamp(record, "paid_at", r["paid_at"])
        if len(rows) > size:
            response.next_page_token = paging.token("p", rows[size - 1]["id"])
        return response

    # ---- the distribution (service role: the scheduler's candydrop.distribution) ---

    async def DistributePrizes(self, request: cd.DistributePrizesRequest, context: grpc.aio.ServicerContext) -> cd.DistributePrizesResponse:
        now = self.settings.clock.now()
        job, period = distribution.check_run(request.job, request.period, request.boundary_hour, now)
        for campaign_id in await store.due_campaigns(self.pool, request.boundary_hour, now - self.settle):
            await self.distribute(campaign_id, job, period)
        response = cd.DistributePrizesResponse()
        for row in await distribution.finished(self.pool, store.LEDGER, job, period):
            response.campaigns.add(
                campaign_id=row["campaign_id"], prize_asset=row["prize_asset"], prize_pool=format_amount(row["prize_pool"]),
                paid=format_amount(row["paid"]), winners=row["winners"], total_candies=row["total_candies"],
            )
        return response

    async def distribute(self, campaign_id: str, job: str, period: str) -> None:
        """Record the campaign's prizes once (freezing its progress), then pay what is unpaid."""

        async def record(conn: asyncpg.Connection, row: asyncpg.Record) -> None:
            tasks = (await store.tasks_of(conn, [campaign_id]))[campaign_id]
            candies = store.candies_by_user(tasks, await store.progress_rows(conn, campaign_id))
            candies = {u: c for u, c in candies.items() if c > 0}
            prizes = domain.prizes(
                kind=PoolKind(row["pool_kind"]), pool=row["prize_pool"], per_candy=row["prize_per_candy"], cap=row["per_user_cap"],
                candies=candies, scale=scale_of(row["prize_asset"]),
            )
            assert sum(prizes.values(), Decimal(0)) <= row["prize_pool"]
            await store.record_prizes(conn, campaign_id, prizes, candies, self.credit_chunk, job, period)
            log.info("candydrop prizes recorded", extra={"campaign": campaign_id, "winners": len(prizes), "job": job, "period": period})

        paid = await self.payer.distribute(
            campaign_id, record, source_owner=domain.prize_account(campaign_id), reference=f"candydrop:prize:{campaign_id}",
        )
        if paid is not None:
            metrics.CAMPAIGNS_DISTRIBUTED.inc()
            metrics.amount(metrics.PRIZES_PAID, paid["prize_asset"], paid["paid"])

    # ---- events (the consumer of exchange.trades, exchange.deposits, simple_earn.accrual)

    @staticmethod
    def parse_exchange(raw: bytes) -> Counted:
        """An ExchangeEvent as what it may count. An unreadable or invalid record raises
        (DecodeError, ValueError, InvalidArgument)."""
        event = exchange_pb2.ExchangeEvent.FromString(raw)
        which = event.WhichOneof("event")
        if which == "spot_trade":
            e = event.spot_trade
            kind, asset, amount_text, amount_field = TaskKind.SPOT_VOLUME, e.quote_asset, e.quote_amount, "spot_trade.quote_amount"
            first = False
        elif which == "futures_trade":
            e = event.futures_trade  # type: ignore[assignment]
            kind, asset, amount_text, amount_field = TaskKind.FUTURES_VOLUME, e.settle_asset, e.notional, "futures_trade.notional"  # type: ignore[attr-defined]
            first = False
        elif which == "deposit":
            e = event.deposit  # type: ignore[assignment]
            kind, asset, amount_text, amount_field = TaskKind.DEPOSIT, e.asset, e.amount, "deposit.amount"  # type: ignore[attr-defined]
            first = e.first_deposit  # type: ignore[attr-defined]
        else:
            raise InvalidArgument("event", "is empty (no spot_trade, futures_trade or deposit)")
        event_id = domain.check_event_id(e.event_id, f"{which}.event_id")
        user = domain.check_user_id(e.user_id, f"{which}.user_id")
        if not asset:
            raise InvalidArgument(f"{which}.asset", "is required")
        amount = parse_amount(amount_text, asset, amount_field)
        if not e.HasField("event_time"):
            raise InvalidArgument(f"{which}.event_time", "is required")
        at = e.event_time.ToDatetime(tzinfo=UTC)
        if kind is TaskKind.DEPOSIT:
            facts = domain.facts_of_deposit(user, asset, amount, at, first)
        else:
            facts = [domain.Fact(kind, user, asset, amount, at)]
        key = str(uuid.uuid5(EXCHANGE_NAMESPACE, f"{which}:{event_id}"))
        return Counted(f"candydrop.exchange.{which}", key, user, facts)

    @staticmethod
    def parse_simple_earn(raw: bytes) -> Counted | None:
        """A Simple Earn PositionChanged as a subscription: the sum of its positive principal
        changes, in the position's asset, at the event's time. None for what counts for no
        task (other types on the topic: ticks, rates, payout requests; redemptions)."""
        env = events.parse(raw)
        if env.type != accrual_pb2.PositionChanged.DESCRIPTOR.full_name:
            return None
        change = events.unwrap(env, accrual_pb2.PositionChanged)
        user = domain.check_user_id(change.user_id)
        scale = scale_of(change.asset, "asset")
        added = Decimal(0)
        for c in change.changes:
            if c.delta and not c.delta.startswith("-"):
                added += parse_decimal(c.delta, "changes.delta", scale=scale, allow_zero=True)
        if added <= 0:
            return None
        facts = [domain.Fact(TaskKind.SIMPLE_EARN_SUBSCRIPTION, user, change.asset, added, events.occurred_at(env))]
        return Counted("candydrop.simple_earn", env.event_id, user, facts)

    async def apply_exchange(self, raw: bytes) -> str:
        """Count one ExchangeEvent: "counted", "not_counted" or "duplicate"."""
        return await self.apply(self.parse_exchange(raw))

    async def apply_simple_earn(self, raw: bytes) -> str:
        parsed = self.parse_simple_earn(raw)
        return "ignored" if parsed is None else await self.apply(parsed)

    async def apply(self, parsed: Counted) -> str:
        return await self._apply(parsed.consumer, parsed.key, parsed.facts)

    async def participants(self, users: set[str]) -> set[str]:
        """Which of ``users`` are registered in a campaign not distributed yet: the events of
        the others count for nothing and are dropped without a transaction each."""
        return await store.registered_users(self.pool, sorted(users))

    async def _apply(self, consumer: str, event_key: str, facts: list[domain.Fact]) -> str:
        """One transaction: what the event counts, its inbox row, the progress. An event
        that counts for nothing writes nothing (not even its inbox row): delivered again,
        it again counts for nothing, or for what a registration committed meanwhile made
        it count, once. So the inbox holds only events of registered users."""
        async with self.pool.acquire() as conn, conn.transaction():
            adds = await store.counted(conn, facts)
            if not adds:
                return "not_counted"
            if not await inbox.first_time(conn, consumer, event_key):
                return "duplicate"
            await store.add_progress(conn, facts[0].user_id, adds, self.settings.clock.now())
        return "counted"

    async def park(self, topic: str, partition: int, offset: int, error: str, raw: bytes) -> None:
        await deadletters.park(self.pool, topic, partition, offset, error, raw)

