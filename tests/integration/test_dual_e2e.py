"""Dual Investment end to end, through gRPC and Kafka only: the wallet, the market and
the dual service as processes; index ticks published on market.prices as the exchange
would; plans settled by the scheduler's CLI (job dual.settlement).

Every settlement amount is checked to the unit against a reference written here with
fractions and integer floors (independently of services.dual.domain): sell-high and
buy-low, each in and out of the money, the strike exactly hit in both directions; a
settlement window with missing prices fails the run loudly (the plan and its
subscriptions failed with the market's reason naming the gap, nothing paid), then
succeeds after an operator backfill. Every user's balances and the treasury are checked
too, and the ledger sums to zero.

Then the kill test: many subscriptions on three plans. A first run stops half-way for
certain (the treasury runs out of USDT after a few payouts: some subscriptions settled,
the next failed with the wallet's reason); the treasury is funded, and while the CLI
settles the rest, the dual service and the CLI are SIGKILLed at seeded random moments
(EARN_CHAOS_SEED replays one) and restarted; in the end every subscription is paid
exactly once (balances equal the reference, one payout transfer per subscription).

Time is a file clock shared by the processes; the test moves it."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from earn.v1 import dual_pb2 as du, dual_pb2_grpc, market_pb2 as mk, wallet_pb2 as wp
from services.market import domain as market_domain
from tests.conftest import GATEWAY, OPERATOR, unique
from tests.integration import _world

H0 = datetime(2031, 6, 2, tzinfo=UTC)
JOB = "dual.settlement"
SCALES = {"BTC": 8, "USDT": 6, "ETH": 18}
FUNDING, HOLD, TREASURY, EXTERNAL = wp.ACCOUNT_KIND_FUNDING, wp.ACCOUNT_KIND_HOLD, wp.ACCOUNT_KIND_TREASURY, wp.ACCOUNT_KIND_EXTERNAL
SELL, BUY = du.DUAL_DIRECTION_SELL_HIGH, du.DUAL_DIRECTION_BUY_LOW
DAY_US = 86_400 * 10**6


def at(hours: int, minutes: int = 0, seconds: float = 0) -> datetime:
    return H0 + timedelta(hours=hours, minutes=minutes, seconds=seconds)


def ts(moment: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(moment)
    return t


def us(moment: datetime) -> int:
    return market_domain.micros(moment)


# ---- the reference ---------------------------------------------------------------------


def ref_twap(ticks: list[tuple[datetime, Decimal]], start: datetime, end: datetime, scale: int) -> Decimal:
    """The price in force at each microsecond, averaged over [start, end), half even."""
    points = sorted(ticks)
    total = Fraction(0)
    for i, (moment, price) in enumerate(points):
        nxt = points[i + 1][0] if i + 1 < len(points) else end
        lo, hi = max(moment, start), min(nxt, end)
        if hi > lo:
            total += Fraction(price) * (us(hi) - us(lo))
    return Decimal(round(total / (us(end) - us(start)) * 10**scale)).scaleb(-scale)


def ref_payout(direction: int, base: str, quote: str, strike: str, apr: str, amount: str, subscribed: datetime, settle: datetime,
               price: Decimal) -> tuple[str, Decimal]:
    """PRODUCT_RULES.md: y = APR x days / 365; sell-high S >= K: P K (1+y) quote, else P (1+y) base;
    buy-low S <= K: P / K (1+y) base, else P (1+y) quote; truncated to the payout asset."""
    y = Fraction(apr) * Fraction(us(settle) - us(subscribed), DAY_US) / 365
    p, k, s = Fraction(amount), Fraction(strike), Fraction(price)
    if direction == SELL:
        asset, value = (quote, p * k * (1 + y)) if s >= k else (base, p * (1 + y))
    else:
        asset, value = (base, p / k * (1 + y)) if s <= k else (quote, p * (1 + y))
    units = value * 10 ** SCALES[asset]
    return asset, Decimal(units.numerator // units.denominator).scaleb(-SCALES[asset])


# ---- processes -------------------------------------------------------------------------


@dataclass(kw_only=True)
class World(_world.PricedWorld):
    dual: dual_pb2_grpc.DualServiceStub
    ticks: dict[str, list[tuple[datetime, Decimal]]] = field(default_factory=dict)

    async def publish(self, pair: str, ticks: list[tuple[datetime, Decimal]]) -> None:
        await super().publish(pair, ticks)
        self.ticks.setdefault(pair, []).extend(ticks)


@asynccontextmanager
async def world(stack, name: str) -> AsyncIterator[World]:  # type: ignore[no-untyped-def]
    async with _world.priced(stack, name, at(0, 10), "dual", JOB) as (fields, channel):
        yield World(**fields, dual=dual_pb2_grpc.DualServiceStub(channel))


@dataclass
class Sub:
    user: str
    plan: str
    amount: str
    subscribed: datetime
    subscription_id: str = ""


@dataclass
class PlanSpec:
    plan_id: str
    direction: int
    base: str
    quote: str
    strike: str
    apr: str
    settle: datetime

    @property
    def invest(self) -> str:
        return self.base if self.direction == SELL else self.quote


async def create(w: World, p: PlanSpec, minimum: str = "0.001", maximum: str = "1000000", quota: str = "10000000") -> None:
    reply = await w.dual.CreateDualPlan(du.CreateDualPlanRequest(
        idempotency_key=unique(), plan_id=p.plan_id, base_asset=p.base, quote_asset=p.quote, direction=p.direction, strike=p.strike, apr=p.apr,
        settlement_time=ts(p.settle), min_amount=minimum, max_per_user=maximum, quota=quota,
    ), metadata=OPERATOR)
    assert reply.plan.status == du.DUAL_PLAN_STATUS_OPEN and reply.plan.invest_asset == p.invest


async def subscribe(w: World, s: Sub, plans: dict[str, PlanSpec]) -> None:
    w.move(s.subscribed)
    request = du.SubscribeDualRequest(client_order_id=unique("order"), user_id=s.user, plan_id=s.plan, amount=s.amount)
    reply = await w.dual.SubscribeDual(request, metadata=GATEWAY)
    assert await w.dual.SubscribeDual(request, metadata=GATEWAY) == reply  # the same order again: the same subscription
    assert reply.subscription.status == du.DUAL_SUBSCRIPTION_STATUS_SUBSCRIBED
    assert reply.subscription.subscribed_at.ToDatetime(tzinfo=UTC) == s.subscribed
    s.subscription_id = reply.subscription.subscription_id


async def fund(w: World, users: dict[str, dict[str, str]], treasury: dict[str, str]) -> None:
    for user, assets in users.items():
        for asset, amount in assets.items():
            await w.wallet.Deposit(wp.DepositRequest(idempotency_key=unique(), owner=user, asset=asset, amount=amount), metadata=OPERATOR)
    for asset, amount in treasury.items():
        await w.wallet.Transfer(wp.TransferRequest(idempotency_key=unique(), transfer=wp.TransferSpec(
            asset=asset, source=wp.AccountRef(owner="dual", kind=EXTERNAL), destination=wp.AccountRef(owner="dual", kind=TREASURY), amount=amount,
        )), metadata=OPERATOR)


def walk_ticks(rng: random.Random, start: datetime, end: datetime, step: int, center: int, spread: int) -> list[tuple[datetime, Decimal]]:
    out, moment = [], start
    while moment < end:
        out.append((moment, Decimal(rng.randint(center - spread, center + spread) * 10**6 + rng.randint(0, 10**6 - 1)).scaleb(-6)))
        moment += timedelta(seconds=step)
    return out


async def check_settled(w: World, subs: list[Sub], plans: dict[str, PlanSpec], prices: dict[str, Decimal],
                        expected_converted: dict[str, bool] | None = None) -> dict[tuple[str, str], Decimal]:
    """Every subscription settled exactly as the reference says; returns the payouts per (user, asset)."""
    paid: dict[tuple[str, str], Decimal] = {}
    for s in subs:
        p = plans[s.plan]
        asset, amount = ref_payout(p.direction, p.base, p.quote, p.strike, p.apr, s.amount, s.subscribed, p.settle, prices[s.plan])
        reply = await w.dual.GetDualSubscription(du.GetDualSubscriptionRequest(user_id=s.user, subscription_id=s.subscription_id), metadata=GATEWAY)
        got = reply.subscription
        assert got.status == du.DUAL_SUBSCRIPTION_STATUS_SETTLED, got
        assert (got.settlement.payout_asset, Decimal(got.settlement.payout_amount)) == (asset, amount), (s, got.settlement)
        assert Decimal(got.settlement.settlement_price) == prices[s.plan]
        if expected_converted is not None:
            assert got.settlement.converted == expected_converted[s.plan], s.plan
        paid[(s.user, asset)] = paid.get((s.user, asset), Decimal(0)) + amount
    return paid


# ---- the scenario ----------------------------------------------------------------------


async def test_settlements_to_the_unit_with_a_missing_window_and_a_backfill(stack) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(20310602)
    async with world(stack, "dual") as w:
        users = {n: unique(n) for n in ("alice", "bob", "carol", "dave")}
        A, B, C, D = (users[n] for n in ("alice", "bob", "carol", "dave"))
        deposits = {A: {"BTC": "3", "USDT": "200000"}, B: {"BTC": "2", "USDT": "100000"}, C: {"BTC": "2", "USDT": "50000", "ETH": "10"},
                    D: {"USDT": "80000", "ETH": "5"}}
        treasury = {"BTC": "50", "USDT": "5000000", "ETH": "100"}
        await fund(w, deposits, treasury)
        t8, t9, t10 = at(8), at(9), at(10)
        # BTC/USDT around 61,000 in the window before 08:00: these plans convert or not by their strike.
        plans = {p.plan_id: p for p in (
            PlanSpec(unique("sh-in"), SELL, "BTC", "USDT", "58000", "0.1234", t8),   # S >= K: quote
            PlanSpec(unique("sh-out"), SELL, "BTC", "USDT", "64000", "0.5", t8),     # S < K: base
            PlanSpec(unique("bl-in"), BUY, "BTC", "USDT", "64000", "0.2718", t8),    # S <= K: base
            PlanSpec(unique("bl-out"), BUY, "BTC", "USDT", "58000", "0.05", t8),     # S > K: quote
            PlanSpec(unique("sh-hit"), SELL, "BTC", "USDT", "62000.5", "0.3", t9),   # S == K exactly: quote
            PlanSpec(unique("bl-hit"), BUY, "BTC", "USDT", "62000.5", "0.3", t9),    # S == K exactly: base
            PlanSpec(unique("eth-sh"), SELL, "ETH", "USDT", "3000", "0.15", t10),    # the window with a hole
            PlanSpec(unique("eth-bl"), BUY, "ETH", "USDT", "3000", "0.15", t10),
        )}
        name = {k: k.split("-")[0] + "-" + k.split("-")[1] for k in plans}
        for p in plans.values():
            await create(w, p)
        by = {name[k]: k for k in plans}
        subs = [
            Sub(A, by["sh-in"], "0.12345678", at(0, 20, 7)), Sub(B, by["sh-in"], "0.5", at(1, 3, 11.25)),
            Sub(A, by["sh-out"], "1.00000001", at(0, 45)), Sub(C, by["sh-out"], "0.33333333", at(2, 59, 59)),
            Sub(A, by["bl-in"], "12345.678901", at(1, 30)), Sub(D, by["bl-in"], "999.999999", at(3, 0, 0.5)),
            Sub(B, by["bl-out"], "7777.777777", at(4, 12)), Sub(D, by["bl-out"], "0.01", at(6, 1)),
            Sub(C, by["sh-hit"], "0.87654321", at(5)), Sub(A, by["bl-hit"], "31000.25", at(6, 30)),
            Sub(C, by["eth-sh"], "2.123456789012345678", at(7)), Sub(D, by["eth-bl"], "4321.5", at(7, 10)),
        ]
        for s in sorted(subs, key=lambda s: s.subscribed):
            await subscribe(w, s, plans)
        # Closed once the settlement window starts.
        w.move(at(7, 30))
        try:
            await w.dual.SubscribeDual(du.SubscribeDualRequest(client_order_id=unique(), user_id=A, plan_id=by["sh-in"], amount="0.1"), metadata=GATEWAY)
            raise AssertionError("subscribed into a closed plan")
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "closed for subscriptions" in (err.details() or "")

        # The index: BTC/USDT every 20 s from 07:29:50 (in force at 07:30) to 07:59:50, then a constant
        # 62000.5 from 08:30:00 exactly; ETH/USDT every 30 s in the window before 10:00 but for a 3-minute hole.
        btc8 = walk_ticks(rng, at(7, 29, 50), t8, 20, 61000, 900)
        btc9 = [(at(8, 30) + timedelta(seconds=30 * i), Decimal("62000.5")) for i in range(60)]
        eth = [(at(9, 30) + timedelta(seconds=30 * i), Decimal(rng.randint(2990, 3010)) + Decimal(rng.randint(0, 999999)).scaleb(-6))
               for i in range(60) if not 20 <= i < 26]
        await w.publish("BTC/USDT", btc8 + btc9 + [(at(9, 0, 5), Decimal("1"))])  # a tick after 09:00 does not count
        await w.publish("ETH/USDT", eth)
        s8 = ref_twap(btc8, at(7, 30), t8, 6)
        assert Decimal(58000) < s8 < Decimal(64000), s8
        s10_hole = (at(9, 30) + timedelta(seconds=30 * 19), at(9, 30) + timedelta(seconds=30 * 26))

        # 09:05: the 08:00 and 09:00 plans settle.
        w.move(at(9, 5))
        await w.catch_up()
        prices = {k: s8 if p.settle == t8 else Decimal("62000.5") for k, p in plans.items() if p.settle != t10}
        converted = {by["sh-in"]: True, by["sh-out"]: False, by["bl-in"]: True, by["bl-out"]: False, by["sh-hit"]: True, by["bl-hit"]: True}
        settled_subs = [s for s in subs if plans[s.plan].settle != t10]
        paid = await check_settled(w, settled_subs, plans, prices, converted)
        for k in converted:
            plan = (await w.dual.GetDualPlan(du.GetDualPlanRequest(plan_id=k), metadata=GATEWAY)).plan
            assert plan.status == du.DUAL_PLAN_STATUS_SETTLED and Decimal(plan.settlement_price) == prices[k]

        # 10:05: the ETH window has a hole: the run fails loudly, nothing moves.
        w.move(at(10, 5))
        before = {(u, a): await w.balance(u, a) for u in (C, D) for a in ("ETH", "USDT")}
        output = await w.catch_up(ok=False)
        gap = f"no tick between {market_domain.iso(us(s10_hole[0]))} and {market_domain.iso(us(s10_hole[1]))}"
        assert "prices missing for ETH/USDT" in output and gap in output, output
        for k in (by["eth-sh"], by["eth-bl"]):
            plan = (await w.dual.GetDualPlan(du.GetDualPlanRequest(plan_id=k), metadata=OPERATOR)).plan
            assert plan.status == du.DUAL_PLAN_STATUS_FAILED and gap in plan.failure_reason, plan
        listed = await w.dual.ListDualSubscriptions(du.ListDualSubscriptionsRequest(user_id=C, plan_id=by["eth-sh"]), metadata=GATEWAY)
        assert [s.status for s in listed.subscriptions] == [du.DUAL_SUBSCRIPTION_STATUS_FAILED] and gap in listed.subscriptions[0].failure_reason
        assert {(u, a): await w.balance(u, a) for u in (C, D) for a in ("ETH", "USDT")} == before
        # The operator backfills the hole; the next run settles.
        fill = [(at(9, 30) + timedelta(seconds=30 * i), Decimal("3001.123456")) for i in range(20, 26)]
        reply = await w.market.BackfillPrices(mk.BackfillPricesRequest(
            idempotency_key=unique(), pair="ETH/USDT", ticks=[mk.BackfillTick(price=str(p), event_time=ts(t)) for t, p in fill],
        ), metadata=OPERATOR)
        assert reply.inserted == 6
        await w.catch_up()
        s10 = ref_twap(eth + fill, at(9, 30), t10, 6)
        eth_subs = [s for s in subs if plans[s.plan].settle == t10]
        eth_paid = await check_settled(w, eth_subs, plans, {by["eth-sh"]: s10, by["eth-bl"]: s10})
        for key, value in eth_paid.items():
            paid[key] = paid.get(key, Decimal(0)) + value

        # Balances: deposit - invested + paid; nothing held; the treasury holds the rest; the ledger sums to zero.
        invested: dict[tuple[str, str], Decimal] = {}
        for s in subs:
            key = (s.user, plans[s.plan].invest)
            invested[key] = invested.get(key, Decimal(0)) + Decimal(s.amount)
        for user, assets in deposits.items():
            for asset in ("BTC", "USDT", "ETH"):
                expected = Decimal(assets.get(asset, "0")) - invested.get((user, asset), Decimal(0)) + paid.get((user, asset), Decimal(0))
                assert await w.balance(user, asset) == expected, (user, asset)
                assert await w.balance(user, asset, HOLD) == 0
        for asset in ("BTC", "USDT", "ETH"):
            expected = (Decimal(treasury[asset]) + sum((v for (u, a), v in invested.items() if a == asset), Decimal(0))
                        - sum((v for (u, a), v in paid.items() if a == asset), Decimal(0)))
            assert await w.balance("dual", asset, TREASURY) == expected, asset
        totals = await w.wallet.GetLedgerTotals(wp.GetLedgerTotalsRequest(), metadata=OPERATOR)
        assert all(Decimal(t.sum) == 0 for t in totals.totals), totals

        # A later run has nothing left to do and pays nothing again.
        w.move(at(11, 5))
        await w.catch_up()
        for user, assets in deposits.items():
            for asset in ("BTC", "USDT", "ETH"):
                expected = Decimal(assets.get(asset, "0")) - invested.get((user, asset), Decimal(0)) + paid.get((user, asset), Decimal(0))
                assert await w.balance(user, asset) == expected


async def test_settlement_killed_and_rerun_pays_exactly_once(stack) -> None:  # type: ignore[no-untyped-def]
    seed = int(os.environ.get("EARN_CHAOS_SEED") or random.SystemRandom().randrange(2**31))
    print(f"EARN_CHAOS_SEED={seed}")
    chaos = random.Random(seed)
    async with world(stack, "dualkill") as w:
        users = [unique(f"u{i}") for i in range(24)]
        # The treasury has BTC but no USDT of its own yet: the first run stops part-way.
        await fund(w, {u: {"BTC": "1", "USDT": "100000"} for u in users}, {"BTC": "100"})
        plans = {p.plan_id: p for p in (
            PlanSpec("k2-" + unique("sh"), SELL, "BTC", "USDT", "60000", "0.25", at(3)),
            PlanSpec("k1-" + unique("bl"), BUY, "BTC", "USDT", "61000", "0.25", at(3)),
            PlanSpec("k3-" + unique("late"), SELL, "BTC", "USDT", "65000", "0.4", at(4)),
        )}
        for p in plans.values():
            await create(w, p)
        ids = list(plans)
        subs = []
        for i, u in enumerate(users):
            subs.append(Sub(u, ids[0], f"0.{i + 1:02d}345678", at(0, 20, i)))
            subs.append(Sub(u, ids[1], f"{1000 + i}.123456", at(1, 5, i)))
            subs.append(Sub(u, ids[2], f"0.{i + 3:02d}1", at(2, 5, i)))
        for s in sorted(subs, key=lambda s: s.subscribed):
            await subscribe(w, s, plans)
        ticks = walk_ticks(random.Random(seed), at(2, 29, 40), at(3), 20, 60500, 400) + walk_ticks(random.Random(seed + 1), at(3, 29, 40), at(4), 20, 62000, 400)
        await w.publish("BTC/USDT", ticks)
        w.move(at(4, 5))
        # A deterministic half-done settlement: the buy-low plan's captured USDT pays the first
        # sell-high payouts in quote, then the treasury runs short; the run fails with the reason.
        output = await w.catch_up(ok=False)
        assert "insufficient funds in dual/USDT/treasury" in output, output
        sh = ids[0]
        listed = await w.dual.ListDualSubscriptions(du.ListDualSubscriptionsRequest(plan_id=sh, page_size=1000), metadata=OPERATOR)
        statuses = [s.status for s in listed.subscriptions]
        assert statuses.count(du.DUAL_SUBSCRIPTION_STATUS_SETTLED) >= 1 and du.DUAL_SUBSCRIPTION_STATUS_FAILED in statuses, statuses
        failed = next(s for s in listed.subscriptions if s.status == du.DUAL_SUBSCRIPTION_STATUS_FAILED)
        assert "insufficient funds" in failed.failure_reason and failed.settlement.payout_asset == "USDT"
        plan = (await w.dual.GetDualPlan(du.GetDualPlanRequest(plan_id=sh), metadata=OPERATOR)).plan
        assert plan.status == du.DUAL_PLAN_STATUS_FAILED and "insufficient funds" in plan.failure_reason
        await fund(w, {}, {"USDT": "10000000"})
        kills = 0
        for _ in range(3):
            kills += await w.kill_at_random("dual", chaos, 0.3, 2.0)
        await w.catch_up()
        prices = {k: ref_twap(ticks, p.settle - timedelta(minutes=30), p.settle, 6) for k, p in plans.items()}
        paid = await check_settled(w, subs, plans, prices)
        for u in users:
            for asset in ("BTC", "USDT"):
                invested = sum((Decimal(s.amount) for s in subs if s.user == u and plans[s.plan].invest == asset), Decimal(0))
                start = Decimal(1) if asset == "BTC" else Decimal(100000)
                assert await w.balance(u, asset) == start - invested + paid.get((u, asset), Decimal(0)), (u, asset, seed)
            listed = await w.wallet.ListTransfers(wp.ListTransfersRequest(owner=u, page_size=1000), metadata=OPERATOR)
            payouts = [t.reference for t in listed.transfers if t.reference.startswith("dual:settlement:")]
            assert len(payouts) == len(set(payouts)) == sum(1 for s in subs if s.user == u), (u, payouts, seed)
        totals = await w.wallet.GetLedgerTotals(wp.GetLedgerTotalsRequest(), metadata=OPERATOR)
        assert all(Decimal(t.sum) == 0 for t in totals.totals), totals
        print(f"kills: {kills}")
