"""Dual Investment gRPC servicer: validate and convert, call the wallet and the market.

- Subscribe (gateway, for ``user_id``): idempotent by (user, client order id). The plan's
  preconditions are checked, then the wallet hold is placed (its key derived from the
  order id and the request, so a retry reuses it), then one transaction records the
  subscription under the plan's row lock after checking the preconditions again. A
  precondition lost in between (quota raced) abandons the hold and releases it before
  the error returns; a hold is used by a subscription or abandoned, never both.
- Settlement (SettleDualPlans, service role: the scheduler's job ``dual.settlement``):
  per due plan, the settlement price is the market's TWAP over the window before the
  settlement time. Missing prices fail the plan and its subscriptions with the market's
  reason, and nothing moves. Otherwise one transaction fixes the price and every
  subscription's settlement record (status settling); then per subscription the hold is
  captured into ("dual", TREASURY) and the payout transferred from ("dual", TREASURY) to
  the user's funding account, both with keys derived from the subscription id, so a run
  killed anywhere and run again pays exactly once; then the subscription is settled.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.dual import domain, metrics, store
from services.dual.domain import Direction, PlanStatus, SubscriptionStatus
from services.kernel import idempotency, paging, peers
from services.kernel.clock import whole_seconds_us
from services.kernel.config import Settings
from services.kernel.errors import AlreadyExists, DomainError, FailedPrecondition, InvalidArgument, NotFound
from services.kernel.grpcserver import GATEWAY, OPERATOR, SERVICE, scoped_user
from services.kernel.ids import parse_serial
from services.kernel.money import format_amount, parse_amount, parse_decimal, scale_of
from services.kernel.peers import Peer, Unavailable
from services.market.domain import micros

from earn.v1 import dual_pb2 as du, dual_pb2_grpc, market_pb2, wallet_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "earn.v1.DualService"
HOLDER = "dual"
MAX_HOLD_ATTEMPTS = 5
MAX_APR = Decimal(10)
_QUERY = frozenset({GATEWAY, OPERATOR, SERVICE})
ROLES = {
    f"{SERVICE_NAME}/{method}": roles
    for method, roles in {
        "CreateDualPlan": frozenset({OPERATOR}),
        "GetDualPlan": _QUERY,
        "ListDualPlans": _QUERY,
        "GetDualSubscription": _QUERY,
        "ListDualSubscriptions": _QUERY,
        "SubscribeDual": frozenset({GATEWAY}),
        "SettleDualPlans": frozenset({SERVICE}),
    }.items()
}

_DIRECTION = {du.DUAL_DIRECTION_SELL_HIGH: Direction.SELL_HIGH, du.DUAL_DIRECTION_BUY_LOW: Direction.BUY_LOW}
_DIRECTION_OUT = {v: k for k, v in _DIRECTION.items()}
_PLAN_STATUS_OUT = {
    PlanStatus.OPEN: du.DUAL_PLAN_STATUS_OPEN, PlanStatus.CLOSED: du.DUAL_PLAN_STATUS_CLOSED, PlanStatus.SETTLING: du.DUAL_PLAN_STATUS_SETTLING,
    PlanStatus.SETTLED: du.DUAL_PLAN_STATUS_SETTLED, PlanStatus.FAILED: du.DUAL_PLAN_STATUS_FAILED,
}
_PLAN_STATUS_IN = {v: k for k, v in _PLAN_STATUS_OUT.items()}
_SUB_STATUS_OUT = {
    SubscriptionStatus.SUBSCRIBED: du.DUAL_SUBSCRIPTION_STATUS_SUBSCRIBED, SubscriptionStatus.SETTLING: du.DUAL_SUBSCRIPTION_STATUS_SETTLING,
    SubscriptionStatus.SETTLED: du.DUAL_SUBSCRIPTION_STATUS_SETTLED, SubscriptionStatus.FAILED: du.DUAL_SUBSCRIPTION_STATUS_FAILED,
}
_SUB_STATUS_IN = {v: k for k, v in _SUB_STATUS_OUT.items()}


# services/loan still imports these names from here; they are the kernel's (services.kernel.peers).
Client = Peer
wallet_client = peers.wallet
market_client = peers.market


def _stamp(message: Any, at_us: int) -> None:
    message.FromMicroseconds(at_us)


def _asset(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    scale_of(value, field)
    return value


class DualApi(dual_pb2_grpc.DualServiceServicer):
    def __init__(self, pool: asyncpg.Pool, settings: Settings, wallet: Peer, market: Peer) -> None:
        self.pool = pool
        self.settings = settings
        self.wallet = wallet
        self.market = market

    def _now_us(self) -> int:
        return micros(self.settings.clock.now())

    # ---- messages --------------------------------------------------------------------

    def _plan_message(self, row: asyncpg.Record) -> du.DualPlan:
        plan = store.plan_of(row)
        status = PlanStatus(row["status"])
        if status is PlanStatus.OPEN and self._now_us() >= plan.closes_us:
            status = PlanStatus.CLOSED
        message = du.DualPlan(
            plan_id=plan.plan_id, base_asset=plan.base, quote_asset=plan.quote, direction=_DIRECTION_OUT[plan.direction],
            strike=format_amount(plan.strike), apr=format_amount(plan.apr), window_seconds=plan.window_seconds, invest_asset=plan.invest_asset,
            min_amount=format_amount(plan.min_amount), max_per_user=format_amount(plan.max_per_user), quota=format_amount(plan.quota),
            subscribed=format_amount(row["subscribed"]), left_quota=format_amount(max(plan.quota - row["subscribed"], Decimal(0))),
            status=_PLAN_STATUS_OUT[status], failure_reason=row["failure_reason"] or "",
            settlement_price="" if row["settlement_price"] is None else format_amount(row["settlement_price"]),
        )
        _stamp(message.settlement_time, plan.settle_us)
        message.created_at.FromDatetime(row["created_at"])
        return message

    @staticmethod
    def _subscription_message(row: asyncpg.Record, invest_asset: str) -> du.DualSubscription:
        message = du.DualSubscription(
            subscription_id=str(row["id"]), user_id=row["user_id"], plan_id=row["plan_id"], client_order_id=row["client_order_id"],
            invest_asset=invest_asset, amount=format_amount(row["amount"]), status=_SUB_STATUS_OUT[SubscriptionStatus(row["status"])],
            failure_reason=row["failure_reason"] or "",
        )
        _stamp(message.subscribed_at, row["subscribed_us"])
        if row["payout_asset"] is not None:
            message.settlement.settlement_price = format_amount(row["settlement_price"])
            message.settlement.converted = row["converted"]
            message.settlement.payout_asset = row["payout_asset"]
            message.settlement.payout_amount = format_amount(row["payout_amount"])
            if row["settled_at"] is not None:
                message.settlement.settled_at.FromDatetime(row["settled_at"])
        return message

    async def _subscription_out(self, conn: Any, row: asyncpg.Record) -> du.DualSubscription:
        plan = await store.plan(conn, row["plan_id"])
        return self._subscription_message(row, store.plan_of(plan).invest_asset)

    # ---- operator --------------------------------------------------------------------

    async def CreateDualPlan(self, request: du.CreateDualPlanRequest, context: grpc.aio.ServicerContext) -> du.CreateDualPlanResponse:
        idempotency.check_key(request.idempotency_key)
        plan_id = domain.check_id(request.plan_id, "plan_id")
        base = _asset(request.base_asset, "base_asset")
        quote = _asset(request.quote_asset, "quote_asset")
        if base == quote:
            raise InvalidArgument("quote_asset", "must differ from base_asset")
        if request.direction not in _DIRECTION:
            raise InvalidArgument("direction", "is required (DUAL_DIRECTION_SELL_HIGH or DUAL_DIRECTION_BUY_LOW)" if not request.direction
                                  else f"unknown value {request.direction}")
        direction = _DIRECTION[request.direction]
        strike = parse_decimal(request.strike, "strike", scale=scale_of(quote))
        apr = parse_decimal(request.apr, "apr", scale=domain.APR_SCALE, allow_zero=True)
        if apr > MAX_APR:
            raise InvalidArgument("apr", f"at most {MAX_APR} (a yearly rate as a fraction: 0.05 is 5%)")
        settle_us = whole_seconds_us(request, "settlement_time")
        window = request.window_seconds or domain.DEFAULT_WINDOW_SECONDS
        if not domain.MIN_WINDOW_SECONDS <= window <= domain.MAX_WINDOW_SECONDS:
            raise InvalidArgument("window_seconds", f"must be {domain.MIN_WINDOW_SECONDS} to {domain.MAX_WINDOW_SECONDS} (0: {domain.DEFAULT_WINDOW_SECONDS})")
        domain.check_settlement(settle_us, window, self._now_us())
        invest = base if direction is Direction.SELL_HIGH else quote
        minimum = parse_amount(request.min_amount, invest, "min_amount")
        maximum = parse_amount(request.max_per_user, invest, "max_per_user")
        quota = parse_amount(request.quota, invest, "quota")
        domain.check_limits(minimum, maximum, quota)
        plan = domain.Plan(plan_id, base, quote, direction, strike, apr, settle_us, window, minimum, maximum, quota)

        async def work(conn: asyncpg.Connection) -> du.CreateDualPlanResponse:
            if not await store.insert_plan(conn, plan, self.settings.clock.now()):
                raise AlreadyExists(f"plan_id: plan {plan_id} exists")
            return du.CreateDualPlanResponse(plan=self._plan_message(await store.plan(conn, plan_id)))

        return await idempotency.write_once(self.pool, method="CreateDualPlan", request=request, response_type=du.CreateDualPlanResponse, work=work)

    # ---- queries ---------------------------------------------------------------------

    async def GetDualPlan(self, request: du.GetDualPlanRequest, context: grpc.aio.ServicerContext) -> du.GetDualPlanResponse:
        plan_id = domain.check_id(request.plan_id, "plan_id")
        return du.GetDualPlanResponse(plan=self._plan_message(await store.plan(self.pool, plan_id)))

    async def ListDualPlans(self, request: du.ListDualPlansRequest, context: grpc.aio.ServicerContext) -> du.ListDualPlansResponse:
        wanted = None
        if request.status:
            if request.status not in _PLAN_STATUS_IN:
                raise InvalidArgument("status", f"unknown value {request.status}")
            wanted = request.status
        base = _asset(request.base_asset, "base_asset") if request.base_asset else ""
        quote = _asset(request.quote_asset, "quote_asset") if request.quote_asset else ""
        response = du.ListDualPlansResponse()
        for row in await store.plans(self.pool, base, quote):
            message = self._plan_message(row)
            if wanted is None or message.status == wanted:
                response.plans.append(message)
        return response

    async def GetDualSubscription(self, request: du.GetDualSubscriptionRequest, context: grpc.aio.ServicerContext) -> du.GetDualSubscriptionResponse:
        user = scoped_user(request.user_id)
        if not request.subscription_id:
            raise InvalidArgument("subscription_id", "is required")
        subscription_id = parse_serial(request.subscription_id, "subscription_id")
        row = await store.subscription(self.pool, subscription_id)
        if row is None or (user and row["user_id"] != user):
            raise NotFound(f"subscription_id: no subscription {subscription_id}" + (f" of user {user}" if user else ""))
        return du.GetDualSubscriptionResponse(subscription=await self._subscription_out(self.pool, row))

    async def ListDualSubscriptions(self, request: du.ListDualSubscriptionsRequest, context: grpc.aio.ServicerContext) -> du.ListDualSubscriptionsResponse:
        user = scoped_user(request.user_id)
        plan_id = domain.check_id(request.plan_id, "plan_id") if request.plan_id else ""
        status = ""
        if request.status:
            if request.status not in _SUB_STATUS_IN:
                raise InvalidArgument("status", f"unknown value {request.status}")
            status = _SUB_STATUS_IN[request.status].value
        size = paging.page_size(request.page_size)
        rows = await store.list_subscriptions(self.pool, user, plan_id, status, paging.after(request.page_token, "ds"), size + 1)
        invest: dict[str, str] = {}
        response = du.ListDualSubscriptionsResponse()
        for row in rows[:size]:
            if row["plan_id"] not in invest:
                invest[row["plan_id"]] = store.plan_of(await store.plan(self.pool, row["plan_id"])).invest_asset
            response.subscriptions.append(self._subscription_message(row, invest[row["plan_id"]]))
        if len(rows) > size:
            response.next_page_token = paging.token("ds", rows[size - 1]["id"])
        return response

    # ---- user writes -----------------------------------------------------------------

    async def SubscribeDual(self, request: du.SubscribeDualRequest, context: grpc.aio.ServicerContext) -> du.SubscribeDualResponse:
        order_id = domain.check_order_id(request.client_order_id)
        user = domain.check_user_id(request.user_id)
        plan_id = domain.check_id(request.plan_id, "plan_id")
        row = await store.plan(self.pool, plan_id)
        plan = store.plan_of(row)
        amount = parse_amount(request.amount, plan.invest_asset, "amount")
        key = f"dual:subscribe:{user}:{order_id}"
        method = "SubscribeDual"
        stored = await idempotency.replay(self.pool, method, request, du.SubscribeDualResponse, key=key, field="client_order_id", shown=order_id)
        if stored is not None:
            return stored
        self._check(plan, row, amount, await store.user_total(self.pool, plan_id, user))
        hold_id = await peers.place_hold(
            self.wallet, "dual:hold", method, request, key=key, owner=user, asset=plan.invest_asset, amount=amount,
            holder=HOLDER, reference=f"dual:subscribe:{plan_id}", abandoned=lambda hold_id: store.hold_abandoned(self.pool, hold_id),
            attempts=MAX_HOLD_ATTEMPTS, refused="client_order_id: this order failed too many times; retry with a new client order id",
        )

        async def work() -> du.SubscribeDualResponse:
            locked = await store.plan(conn, plan_id, lock=True)
            self._check(plan, locked, amount, await store.user_total(conn, plan_id, user))
            created = await store.insert_subscription(conn, plan_id, user, order_id, amount, self._now_us(), hold_id)
            if created is None:
                raise FailedPrecondition("client_order_id: the funds of this order were returned; retry with a new client order id")
            return du.SubscribeDualResponse(subscription=self._subscription_message(created, plan.invest_asset))

        try:
            async with self.pool.acquire() as conn, conn.transaction():
                response = await idempotency.once(conn, key=key, method=method, request=request, response_type=du.SubscribeDualResponse, work=work)
        except DomainError as err:  # a precondition lost, or the order id taken by another request meanwhile
            async with self.pool.acquire() as conn, conn.transaction():
                abandoned = await store.abandon_hold(conn, hold_id, amount, err.message)
            if abandoned:
                await self.release_abandoned()
            raise
        metrics.amount(metrics.SUBSCRIBED, amount, plan.invest_asset, plan.direction.value)
        return response

    def _check(self, plan: domain.Plan, row: asyncpg.Record, amount: Decimal, user_total: Decimal) -> None:
        if row["status"] != PlanStatus.OPEN.value:
            raise FailedPrecondition(f"plan_id: plan {plan.plan_id} is {row['status']}; it takes no subscriptions")
        domain.check_subscription(plan, amount, user_total, row["subscribed"], self._now_us())

    async def release_abandoned(self) -> int:
        done = 0
        for r in await store.unreleased_holds(self.pool):
            try:
                await self.wallet.call("ReleaseHold", wallet_pb2.ReleaseHoldRequest(idempotency_key=f"dual:release:{r['hold_id']}", hold_id=str(r["hold_id"])))
            except DomainError as err:
                log.error("releasing an abandoned hold failed; will retry", extra={"hold_id": r["hold_id"], "error": err.message})
                continue
            await store.hold_released(self.pool, r["hold_id"])
            done += 1
        return done

    # ---- settlement (the scheduler) ----------------------------------------------------

    async def SettleDualPlans(self, request: du.SettleDualPlansRequest, context: grpc.aio.ServicerContext) -> du.SettleDualPlansResponse:
        until_us = whole_seconds_us(request, "until")
        now_us = self._now_us()
        if until_us > now_us:
            raise FailedPrecondition(f"until: {request.until.ToJsonString()} is after now")
        response = du.SettleDualPlansResponse()
        ids = []
        for row in await store.due_plans(self.pool, until_us):
            outcome = await self.settle_plan(row)
            response.plans.append(outcome)
            ids.append(row["plan_id"])
        for asset, total in (await store.paid(self.pool, ids)).items():
            response.paid[asset] = format_amount(total)
        return response

    async def settle_plan(self, row: asyncpg.Record) -> du.DualPlanOutcome:
        plan = store.plan_of(row)
        outcome = du.DualPlanOutcome(plan_id=plan.plan_id)
        price = row["settlement_price"]
        if price is None:
            async with self.pool.acquire() as conn:
                subscribers = await conn.fetchval("SELECT count(*) FROM subscriptions WHERE plan_id = $1", plan.plan_id)
            if subscribers == 0:
                await store.finish_plan(self.pool, plan.plan_id, self.settings.clock.now())
                outcome.status = du.DUAL_PLAN_STATUS_SETTLED
                return outcome
            start, end = Timestamp(), Timestamp()
            start.FromMicroseconds(plan.closes_us)
            end.FromMicroseconds(plan.settle_us)
            try:
                twap = await self.market.call("GetTwap", market_pb2.GetTwapRequest(pair=plan.pair, start=start, end=end))
            except (FailedPrecondition, NotFound, Unavailable) as err:
                reason = f"settlement price unavailable: {err.message}"
                async with self.pool.acquire() as conn, conn.transaction():
                    await store.fail_plan(conn, plan.plan_id, reason)
                metrics.PLAN_FAILURES.labels("prices").inc()
                log.error("dual settlement failed", extra={"plan": plan.plan_id, "reason": reason})
                outcome.status, outcome.failure_reason = du.DUAL_PLAN_STATUS_FAILED, reason
                return outcome
            price = Decimal(twap.twap)
            async with self.pool.acquire() as conn, conn.transaction():
                locked = await store.plan(conn, plan.plan_id, lock=True)
                if locked["settlement_price"] is None:
                    subs = await conn.fetch("SELECT id, amount, subscribed_us FROM subscriptions WHERE plan_id = $1 ORDER BY id", plan.plan_id)
                    records = []
                    for s in subs:
                        payout = domain.settle(plan, s["amount"], s["subscribed_us"], price)
                        records.append((s["id"], payout.converted, payout.asset, payout.amount))
                    await store.fix_price(conn, plan.plan_id, price, twap.ticks, records)
                else:
                    price = locked["settlement_price"]
        outcome.settlement_price = format_amount(price)
        for s in await store.to_pay(self.pool, plan.plan_id):
            try:
                await self._pay(plan, s)
            except (FailedPrecondition, Unavailable, NotFound) as err:
                reason = f"payout of subscription {s['id']} failed: {err.message}"
                await store.fail_subscription(self.pool, s["id"], reason)
                async with self.pool.acquire() as conn, conn.transaction():
                    await conn.execute("UPDATE plans SET status = 'failed', failure_reason = $2 WHERE plan_id = $1", plan.plan_id, reason)
                metrics.PLAN_FAILURES.labels("wallet").inc()
                log.error("dual payout failed", extra={"plan": plan.plan_id, "reason": reason})
                outcome.status, outcome.failure_reason = du.DUAL_PLAN_STATUS_FAILED, reason
                outcome.subscriptions_settled = await store.plan_settled_count(self.pool, plan.plan_id)
                return outcome
        await store.finish_plan(self.pool, plan.plan_id, self.settings.clock.now())
        outcome.status = du.DUAL_PLAN_STATUS_SETTLED
        outcome.subscriptions_settled = await store.plan_settled_count(self.pool, plan.plan_id)
        return outcome

    async def _pay(self, plan: domain.Plan, s: asyncpg.Record) -> None:
        """Capture the hold into the treasury, pay the settlement from it, mark settled;
        every step keyed by the subscription, so a repeat pays nothing twice."""
        treasury = wallet_pb2.AccountRef(owner=domain.TREASURY_OWNER, kind=wallet_pb2.ACCOUNT_KIND_TREASURY)
        await self.wallet.call(
            "CaptureHold", wallet_pb2.CaptureHoldRequest(idempotency_key=f"dual:capture:{s['id']}", hold_id=str(s["hold_id"]), destination=treasury),
        )
        if s["payout_amount"] > 0:
            await self.wallet.call(
                "Transfer",
                wallet_pb2.TransferRequest(
                    idempotency_key=f"dual:payout:{s['id']}",
                    transfer=wallet_pb2.TransferSpec(
                        asset=s["payout_asset"], source=treasury, destination=wallet_pb2.AccountRef(owner=s["user_id"], kind=wallet_pb2.ACCOUNT_KIND_FUNDING),
                        amount=format_amount(s["payout_amount"]), reference=f"dual:settlement:{plan.plan_id}:{s['id']}",
                    ),
                ),
            )
        if await store.mark_settled(self.pool, s["id"], self.settings.clock.now()):
            metrics.amount(metrics.PAID, s["payout_amount"], s["payout_asset"])
            metrics.SETTLED.labels("converted" if s["converted"] else "not_converted").inc()
