"""Smart Leverage end to end, through gRPC and Kafka only: the wallet, the market and the
leverage service as processes; index ticks published on market.prices as the exchange
would; positions settled by the scheduler's CLI (job leverage.settlement).

Every settlement amount is checked to the unit against a reference written here with
fractions and integer floors (independently of services.leverage.domain): long and short,
each in and out of the money, leverage at the product's maximum, a payoff floored at
zero, a payout capped at what the product's treasury holds; an expired quote refused, and
one whose index moved more than 5% from its entry price; a
settlement window with missing prices failing the run loudly (the positions failed with
the market's reason naming the gap, nothing paid), then settling after an operator
backfill; early redemption at the current index. The exposure gauge follows the open
positions. Every user's balance and the treasuries are checked, and the ledger sums to zero.

Then the kill test: many positions. A first run stops half-way for certain (the service
SIGKILLs itself after the wallet paid a few positions and before recording them:
EARN_CRASH_AFTER_PAYOUTS); then, while the CLI settles the rest, the leverage service and
the CLI are SIGKILLed at seeded random moments (EARN_CHAOS_SEED replays one) and
restarted; in the end every position is paid exactly once.

Time is a file clock shared by the processes; the test moves it."""

from __future__ import annotations

import asyncio
import os
import random
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from earn.v1 import leverage_pb2 as lv, leverage_pb2_grpc, market_pb2 as mk, wallet_pb2 as wp
from services.market import domain as market_domain
from tests.conftest import GATEWAY, OPERATOR, eventually, unique
from tests.integration import _world

H0 = datetime(2031, 7, 1, tzinfo=UTC)
JOB = "leverage.settlement"
FUNDING, HOLD, TREASURY, EXTERNAL = wp.ACCOUNT_KIND_FUNDING, wp.ACCOUNT_KIND_HOLD, wp.ACCOUNT_KIND_TREASURY, wp.ACCOUNT_KIND_EXTERNAL
LONG, SHORT = lv.LEVERAGE_DIRECTION_LONG, lv.LEVERAGE_DIRECTION_SHORT


def at(hours: int, minutes: int = 0, seconds: float = 0) -> datetime:
    return H0 + timedelta(hours=hours, minutes=minutes, seconds=seconds)


def ts(moment: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(moment)
    return t


def us(moment: datetime) -> int:
    return market_domain.micros(moment)


# ---- the reference ---------------------------------------------------------------------


def ref_twap(ticks: list[tuple[datetime, Decimal]], start: datetime, end: datetime) -> Decimal:
    """The price in force at each microsecond, averaged over [start, end), half even, 6 digits."""
    points = sorted(ticks)
    total = Fraction(0)
    for i, (moment, price) in enumerate(points):
        nxt = points[i + 1][0] if i + 1 < len(points) else end
        lo, hi = max(moment, start), min(nxt, end)
        if hi > lo:
            total += Fraction(price) * (us(hi) - us(lo))
    return Decimal(round(total / (us(end) - us(start)) * 10**6)).scaleb(-6)


def ref_breakeven(direction: int, entry: Decimal, fee: str) -> Decimal:
    """Long P0 (1 + fee) rounded up, short P0 (1 - fee) rounded down, to 6 digits."""
    value = Fraction(entry) * (1 + Fraction(fee) if direction == LONG else 1 - Fraction(fee)) * 10**6
    units = -((-value.numerator) // value.denominator) if direction == LONG else value.numerator // value.denominator
    return Decimal(units).scaleb(-6)


def ref_payoff(direction: int, principal: str, leverage: str, breakeven: Decimal, price: Decimal) -> Decimal:
    """PRODUCT_RULES.md: long max(0, I + I L (S - B) / B), short max(0, I + I L (B - S) / B), floored to 6 digits."""
    i, lev, b, s = Fraction(principal), Fraction(leverage), Fraction(breakeven), Fraction(price)
    value = max(Fraction(0), i + i * lev * ((s - b) if direction == LONG else (b - s)) / b) * 10**6
    return Decimal(value.numerator // value.denominator).scaleb(-6)


# ---- processes -------------------------------------------------------------------------


@dataclass(kw_only=True)
class World(_world.PricedWorld):
    lev: leverage_pb2_grpc.LeverageServiceStub

    def exposure(self) -> dict[tuple[str, str], float]:
        url = self.processes["leverage"].metrics_url
        assert url
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("earn_leverage_exposure{"):
                labels, value = line[len("earn_leverage_exposure{"):].split("} ")
                parts = dict(kv.split("=") for kv in labels.split(","))
                out[(parts["underlying"].strip('"'), parts["direction"].strip('"'))] = float(value)
        return {k: v for k, v in out.items() if v}

    async def start_leverage(self) -> None:
        proc = self.processes["leverage"]
        proc.start()
        await asyncio.to_thread(proc.wait_ready, 60)


@asynccontextmanager
async def world(stack, name: str, **leverage_env: str) -> AsyncIterator[World]:  # type: ignore[no-untyped-def]
    async with _world.priced(
        stack, name, at(0, 10), "leverage", JOB, EARN_QUOTE_VALIDITY_SECONDS="5", EARN_MAX_INDEX_AGE_SECONDS="120", **leverage_env,
    ) as (fields, channel):
        yield World(**fields, lev=leverage_pb2_grpc.LeverageServiceStub(channel))


@dataclass
class Pos:
    user: str
    product: str
    direction: int
    leverage: str
    principal: str
    maturity: datetime
    opened: datetime
    entry: Decimal = Decimal(0)
    breakeven: Decimal = Decimal(0)
    position_id: str = ""


async def create_product(w: World, product_id: str, pair: str, max_leverage: str, fee: str, treasury: str) -> None:
    reply = await w.lev.CreateLeverageProduct(lv.CreateLeverageProductRequest(
        idempotency_key=unique(), product_id=product_id, pair=pair, max_leverage=max_leverage, fee_rate=fee, min_principal="10",
        max_principal="1000000",
    ), metadata=OPERATOR)
    owner = reply.product.treasury_owner
    assert owner == f"leverage.{product_id}"
    if Decimal(treasury):
        await w.wallet.Transfer(wp.TransferRequest(idempotency_key=unique(), transfer=wp.TransferSpec(
            asset="USDT", source=wp.AccountRef(owner=owner, kind=EXTERNAL), destination=wp.AccountRef(owner=owner, kind=TREASURY), amount=treasury,
        )), metadata=OPERATOR)


async def fund(w: World, users: dict[str, str]) -> None:
    for user, amount in users.items():
        await w.wallet.Deposit(wp.DepositRequest(idempotency_key=unique(), owner=user, asset="USDT", amount=amount), metadata=OPERATOR)


async def open_position(w: World, p: Pos, fee: str, index: Decimal) -> None:
    """Quote (its entry price the index in force, its breakeven from the fee), then subscribe with it."""
    w.move(p.opened)
    request = lv.RequestLeverageQuoteRequest(
        idempotency_key=unique(), user_id=p.user, product_id=p.product, direction=p.direction, leverage=p.leverage, principal=p.principal,
        maturity=ts(p.maturity),
    )
    quote = (await w.lev.RequestLeverageQuote(request, metadata=GATEWAY)).quote
    assert (await w.lev.RequestLeverageQuote(request, metadata=GATEWAY)).quote == quote  # the same key: the same quote
    assert Decimal(quote.entry_price) == Decimal(quote.index_price) == index
    assert Decimal(quote.breakeven_price) == ref_breakeven(p.direction, index, fee)
    assert quote.expires_at.ToDatetime(tzinfo=UTC) == p.opened + timedelta(seconds=5)
    p.entry, p.breakeven = index, Decimal(quote.breakeven_price)
    w.move(p.opened + timedelta(seconds=4))  # still valid
    order = lv.SubscribeLeverageRequest(user_id=p.user, quote_id=quote.quote_id)
    reply = await w.lev.SubscribeLeverage(order, metadata=GATEWAY)
    assert await w.lev.SubscribeLeverage(order, metadata=GATEWAY) == reply  # the same quote again: the same position
    got = reply.position
    assert got.status == lv.LEVERAGE_POSITION_STATUS_OPEN and Decimal(got.principal) == Decimal(p.principal)
    assert Decimal(got.breakeven_price) == p.breakeven and got.maturity.ToDatetime(tzinfo=UTC) == p.maturity
    p.position_id = got.position_id


async def check_settled(w: World, p: Pos, price: Decimal, kind: int, cap: Decimal | None = None) -> Decimal:
    """The position settled to the unit as the reference says; returns the payout."""
    payoff = ref_payoff(p.direction, p.principal, p.leverage, p.breakeven, price)
    payout = payoff if cap is None else min(payoff, cap)
    got = (await w.lev.GetLeveragePosition(lv.GetLeveragePositionRequest(user_id=p.user, position_id=p.position_id), metadata=GATEWAY)).position
    assert got.status == lv.LEVERAGE_POSITION_STATUS_SETTLED, got
    s = got.settlement
    assert (s.kind, Decimal(s.settlement_price), Decimal(s.payoff), Decimal(s.payout), s.capped) == (
        kind, price, payoff, payout, payout < payoff), (p, s)
    return payout


def flat(start: datetime, end: datetime, price: Decimal, step: int = 30) -> list[tuple[datetime, Decimal]]:
    out, moment = [], start
    while moment < end:
        out.append((moment, price))
        moment += timedelta(seconds=step)
    return out


def walk(rng: random.Random, start: datetime, end: datetime, center: int, spread: int, step: int = 20) -> list[tuple[datetime, Decimal]]:
    out, moment = [], start
    while moment < end:
        out.append((moment, Decimal(rng.randint(center - spread, center + spread) * 10**6 + rng.randint(0, 10**6 - 1)).scaleb(-6)))
        moment += timedelta(seconds=step)
    return out


# ---- the scenario ----------------------------------------------------------------------


async def test_settlements_to_the_unit_with_expired_quotes_a_missing_window_and_early_redemption(stack) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(20310701)
    async with world(stack, "lev") as w:
        U = {n: unique(n) for n in ("alice", "bob", "carol", "dave", "erin", "frank")}
        deposits = {u: "100000" for u in U.values()}
        await fund(w, deposits)
        btc, eth, thin = unique("btc"), unique("eth"), unique("thin")
        fee = {btc: "0.004", eth: "0.01", thin: "0.002"}
        treasury = {btc: Decimal(1000000), eth: Decimal(500000), thin: Decimal(50)}
        await create_product(w, btc, "BTC/USDT", "25", fee[btc], str(treasury[btc]))
        await create_product(w, eth, "ETH/USDT", "10", fee[eth], str(treasury[eth]))
        await create_product(w, thin, "BTC/USDT", "50", fee[thin], str(treasury[thin]))
        # The index the quotes see: flat 60,000 BTC and 3,000 ETH in the first hour.
        await w.publish("BTC/USDT", flat(at(0, 9), at(0, 30), Decimal("60000.123456")))
        await w.publish("ETH/USDT", flat(at(0, 9), at(0, 30), Decimal("3000.5")))
        t3, t4 = at(3), at(4)
        b0, e0 = Decimal("60000.123456"), Decimal("3000.5")

        # An expired quote is refused, and writes nothing; a fresh one goes through.
        w.move(at(0, 15))
        stale = (await w.lev.RequestLeverageQuote(lv.RequestLeverageQuoteRequest(
            idempotency_key=unique(), user_id=U["alice"], product_id=btc, direction=LONG, leverage="2", principal="100", maturity=ts(t3),
        ), metadata=GATEWAY)).quote
        w.move(at(0, 15, 5))  # exactly the expiry: refused
        try:
            await w.lev.SubscribeLeverage(lv.SubscribeLeverageRequest(user_id=U["alice"], quote_id=stale.quote_id), metadata=GATEWAY)
            raise AssertionError("an expired quote was accepted")
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "expired" in (err.details() or ""), err.details()
        assert await w.balance(U["alice"], kind=HOLD) == 0
        # The index moves more than 5% from the entry price between quote and subscription: refused.
        w.move(at(0, 16, 8))
        moved = (await w.lev.RequestLeverageQuote(lv.RequestLeverageQuoteRequest(
            idempotency_key=unique(), user_id=U["alice"], product_id=btc, direction=SHORT, leverage="2", principal="100", maturity=ts(t3),
        ), metadata=GATEWAY)).quote
        await w.publish("BTC/USDT", [(at(0, 16, 10), Decimal("63200"))])  # P0 is 5.06% of this index below it
        w.move(at(0, 16, 11))
        try:
            await w.lev.SubscribeLeverage(lv.SubscribeLeverageRequest(user_id=U["alice"], quote_id=moved.quote_id), metadata=GATEWAY)
            raise AssertionError("a quote 5% off the index was accepted")
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "moved more than 5%" in (err.details() or ""), err.details()
        assert await w.balance(U["alice"], kind=HOLD) == 0

        positions = [
            Pos(U["alice"], btc, LONG, "25", "1000", t3, at(0, 20)),       # long at the maximum, in the money
            Pos(U["bob"], btc, SHORT, "3.5", "2500.5", t3, at(0, 21)),     # short, out of the money
            Pos(U["carol"], btc, LONG, "7.25", "777.777777", t3, at(0, 22)),  # long, in the money
            Pos(U["dave"], btc, SHORT, "25", "1234.56789", t3, at(0, 23)),  # short at the maximum, floored at zero
            Pos(U["erin"], eth, LONG, "10", "500", t4, at(0, 24)),          # ETH: the window with a hole
            Pos(U["frank"], eth, SHORT, "4", "800", t4, at(0, 25)),
            Pos(U["erin"], thin, LONG, "50", "100", t3, at(0, 26)),         # capped at the thin treasury
            Pos(U["frank"], btc, LONG, "2", "300", t4, at(0, 27)),          # redeemed early
        ]
        for p in positions:
            await open_position(w, p, fee[p.product], b0 if p.product != eth else e0)
        exposure: dict[tuple[str, str], Decimal] = {}
        for p in positions:
            key = ("BTC" if p.product != eth else "ETH", "long" if p.direction == LONG else "short")
            exposure[key] = exposure.get(key, Decimal(0)) + Decimal(p.principal) * Decimal(p.leverage)
        assert w.exposure() == {k: float(v) for k, v in exposure.items()}
        for u in U.values():
            held = sum((Decimal(p.principal) for p in positions if p.user == u), Decimal(0))
            assert await w.balance(u, kind=HOLD) == held and await w.balance(u) == Decimal(100000) - held

        # Early redemption at the index in force (a new tick at 00:50).
        early = positions[-1]
        await w.publish("BTC/USDT", [(at(0, 50, 10), Decimal("61000.654321"))])
        w.move(at(0, 50, 30))
        redeem = lv.RedeemLeverageEarlyRequest(idempotency_key=unique(), user_id=early.user, position_id=early.position_id)
        reply = await w.lev.RedeemLeverageEarly(redeem, metadata=GATEWAY)
        assert reply.position.status == lv.LEVERAGE_POSITION_STATUS_SETTLED, reply
        assert (await w.lev.RedeemLeverageEarly(redeem, metadata=GATEWAY)).position == reply.position  # the same key: paid once
        paid = {early.position_id: await check_settled(w, early, Decimal("61000.654321"), lv.LEVERAGE_CLOSE_KIND_EARLY)}
        exposure[("BTC", "long")] -= Decimal(early.principal) * Decimal(early.leverage)
        assert w.exposure() == {k: float(v) for k, v in exposure.items()}
        try:
            await w.lev.RedeemLeverageEarly(lv.RedeemLeverageEarlyRequest(idempotency_key=unique(), user_id=early.user, position_id=early.position_id),
                                            metadata=GATEWAY)
            raise AssertionError("a settled position was redeemed again")
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()

        # The windows: BTC [02:30, 03:00) well above B (long in, short out); the ETH window has a hole.
        btc3 = walk(rng, at(2, 29, 50), t3, 63000, 400)
        await w.publish("BTC/USDT", btc3 + [(at(3, 0, 5), Decimal("1"))])  # a tick after 03:00 does not count
        s3 = ref_twap(btc3, at(2, 30), t3)
        assert s3 > b0 * Decimal("1.04")
        eth4 = [(at(3, 30) + timedelta(seconds=30 * i), Decimal(rng.randint(2800, 2810)) + Decimal(rng.randint(0, 999999)).scaleb(-6))
                for i in range(60) if not 30 <= i < 36]
        await w.publish("ETH/USDT", eth4)
        w.move(at(3, 5))
        await w.catch_up()
        payout_thin_cap = None
        for p in positions:
            if p.maturity != t3:
                continue
            if p.product == thin:
                payoff = ref_payoff(p.direction, p.principal, p.leverage, p.breakeven, s3)
                payout_thin_cap = treasury[thin] + Decimal(p.principal)  # what the treasury held once the principal was captured
                assert payoff > payout_thin_cap
                paid[p.position_id] = await check_settled(w, p, s3, lv.LEVERAGE_CLOSE_KIND_MATURITY, cap=payout_thin_cap)
            else:
                paid[p.position_id] = await check_settled(w, p, s3, lv.LEVERAGE_CLOSE_KIND_MATURITY)
        assert paid[positions[1].position_id] < Decimal(positions[1].principal)  # short out of the money
        assert paid[positions[0].position_id] > Decimal(positions[0].principal)  # long in the money
        assert paid[positions[3].position_id] == 0  # short at 25x, S 5% above B: floored at zero
        assert await w.balance(f"leverage.{thin}", kind=TREASURY) == 0

        # 04:05: the ETH window has a hole: the run fails loudly, nothing moves.
        w.move(at(4, 5))
        before = {u: await w.balance(u) for u in (U["erin"], U["frank"])}
        output = await w.catch_up(ok=False)
        hole = (at(3, 30) + timedelta(seconds=30 * 29), at(3, 30) + timedelta(seconds=30 * 36))
        gap = f"no tick between {market_domain.iso(us(hole[0]))} and {market_domain.iso(us(hole[1]))}"
        assert "prices missing for ETH/USDT" in output and gap in output, output
        for p in positions[4:6]:
            got = (await w.lev.GetLeveragePosition(lv.GetLeveragePositionRequest(position_id=p.position_id), metadata=OPERATOR)).position
            assert got.status == lv.LEVERAGE_POSITION_STATUS_FAILED and gap in got.failure_reason, got
        assert {u: await w.balance(u) for u in (U["erin"], U["frank"])} == before
        # The operator backfills the hole; the retry settles ETH.
        fill = [(at(3, 30) + timedelta(seconds=30 * i), Decimal("2805.25")) for i in range(30, 36)]
        bf = await w.market.BackfillPrices(mk.BackfillPricesRequest(
            idempotency_key=unique(), pair="ETH/USDT", ticks=[mk.BackfillTick(price=str(p), event_time=ts(t)) for t, p in fill],
        ), metadata=OPERATOR)
        assert bf.inserted == 6
        await w.catch_up()
        s4 = ref_twap(eth4 + fill, at(3, 30), t4)
        for p in positions[4:6]:
            paid[p.position_id] = await check_settled(w, p, s4, lv.LEVERAGE_CLOSE_KIND_MATURITY)
        assert paid[positions[4].position_id] < Decimal(positions[4].principal)  # ETH fell: long out of the money
        assert paid[positions[5].position_id] > Decimal(positions[5].principal)  # short in the money
        assert w.exposure() == {}

        # Balances to the unit; treasuries hold the rest; nothing held; the ledger sums to zero.
        for u in U.values():
            mine = [p for p in positions if p.user == u]
            expected = Decimal(100000) - sum((Decimal(p.principal) for p in mine), Decimal(0)) + sum((paid[p.position_id] for p in mine), Decimal(0))
            assert await w.balance(u) == expected, u
            assert await w.balance(u, kind=HOLD) == 0
        for product in (btc, eth, thin):
            mine = [p for p in positions if p.product == product]
            expected = treasury[product] + sum((Decimal(p.principal) - paid[p.position_id] for p in mine), Decimal(0))
            assert await w.balance(f"leverage.{product}", kind=TREASURY) == expected, product
        totals = await w.wallet.GetLedgerTotals(wp.GetLedgerTotalsRequest(), metadata=OPERATOR)
        assert all(Decimal(t.sum) == 0 for t in totals.totals), totals

        # A later run has nothing to do and pays nothing again.
        w.move(at(5, 5))
        await w.catch_up()
        for u in U.values():
            listed = await w.wallet.ListTransfers(wp.ListTransfersRequest(owner=u, page_size=1000), metadata=OPERATOR)
            refs = [t.reference for t in listed.transfers if t.reference.startswith("leverage:settlement:")]
            assert len(refs) == len(set(refs)) == sum(1 for p in positions if p.user == u and paid[p.position_id] > 0), (u, refs)


async def test_settlement_killed_and_rerun_pays_exactly_once(stack) -> None:  # type: ignore[no-untyped-def]
    seed = int(os.environ.get("EARN_CHAOS_SEED") or random.SystemRandom().randrange(2**31))
    print(f"EARN_CHAOS_SEED={seed}")
    chaos = random.Random(seed)
    async with world(stack, "levkill", EARN_CRASH_AFTER_PAYOUTS="7") as w:
        users = [unique(f"u{i}") for i in range(20)]
        await fund(w, {u: "10000" for u in users})
        product = unique("k")
        await create_product(w, product, "BTC/USDT", "20", "0.005", "10000000")
        await w.publish("BTC/USDT", flat(at(0, 9), at(1), Decimal("60000")))
        positions = []
        for i, u in enumerate(users):
            for j, direction in enumerate((LONG, SHORT)):
                positions.append(Pos(u, product, direction, f"{1 + (i * 7 + j) % 20}", f"{100 + i * 13}.{j}5", at(3), at(0, 20, i * 2 + j)))
        for p in positions:
            await open_position(w, p, "0.005", Decimal(60000))
        ticks = walk(random.Random(seed), at(2, 29, 40), at(3), 60500, 700)
        await w.publish("BTC/USDT", ticks)
        w.move(at(3, 5))
        # A certain half-done run: seven payouts reach the wallet, then the service dies
        # before recording the seventh settled; the run fails.
        output = await w.catch_up(ok=False)
        assert "UNAVAILABLE" in output, output
        proc = w.processes["leverage"]
        assert proc.popen is not None and proc.popen.wait(30) == -9
        proc.env.pop("EARN_CRASH_AFTER_PAYOUTS")
        await w.start_leverage()
        listed = await w.lev.ListLeveragePositions(lv.ListLeveragePositionsRequest(product_id=product, page_size=1000), metadata=OPERATOR)
        statuses = [p.status for p in listed.positions]
        # six paid and recorded (and any paying nothing on the way), the seventh paid but not recorded, the rest not paid
        assert statuses.count(lv.LEVERAGE_POSITION_STATUS_SETTLED) >= 6 and lv.LEVERAGE_POSITION_STATUS_SETTLING in statuses, statuses
        assert lv.LEVERAGE_POSITION_STATUS_OPEN not in statuses, statuses
        kills = 1
        for _ in range(3):
            kills += await w.kill_at_random("leverage", chaos, 0.3, 1.5)
        await w.catch_up()
        price = ref_twap(ticks, at(2, 30), at(3))
        for p in positions:
            await check_settled(w, p, price, lv.LEVERAGE_CLOSE_KIND_MATURITY)
        for u in users:
            mine = [p for p in positions if p.user == u]
            expected = Decimal(10000) - sum((Decimal(p.principal) for p in mine), Decimal(0)) + sum(
                (ref_payoff(p.direction, p.principal, p.leverage, p.breakeven, price) for p in mine), Decimal(0))
            assert await w.balance(u) == expected, (u, seed)
            listed = await w.wallet.ListTransfers(wp.ListTransfersRequest(owner=u, page_size=1000), metadata=OPERATOR)
            refs = [t.reference for t in listed.transfers if t.reference.startswith("leverage:settlement:")]
            nonzero = sum(1 for p in mine if ref_payoff(p.direction, p.principal, p.leverage, p.breakeven, price) > 0)
            assert len(refs) == len(set(refs)) == nonzero, (u, refs, seed)
        totals = await w.wallet.GetLedgerTotals(wp.GetLedgerTotalsRequest(), metadata=OPERATOR)
        assert all(Decimal(t.sum) == 0 for t in totals.totals), totals
        print(f"kills: {kills}")


async def test_a_hold_left_by_a_crash_is_released_once_its_quote_expired(stack) -> None:  # type: ignore[no-untyped-def]
    """The service dies between the wallet hold and the position; the quote expires; the
    sweep releases the hold, and the quote can no longer be subscribed: used or released, never both."""
    async with world(stack, "levhold", EARN_CRASH_AFTER_HOLD="true", EARN_RELEASE_SWEEP_SECONDS="0.3") as w:
        user, product = unique("hold"), unique("h")
        await fund(w, {user: "1000"})
        await create_product(w, product, "BTC/USDT", "10", "0.01", "0")
        await w.publish("BTC/USDT", flat(at(0, 9), at(0, 30), Decimal("60000")))
        w.move(at(0, 20))
        quote = (await w.lev.RequestLeverageQuote(lv.RequestLeverageQuoteRequest(
            idempotency_key=unique(), user_id=user, product_id=product, direction=LONG, leverage="3", principal="400", maturity=ts(at(3)),
        ), metadata=GATEWAY)).quote
        try:
            await w.lev.SubscribeLeverage(lv.SubscribeLeverageRequest(user_id=user, quote_id=quote.quote_id), metadata=GATEWAY)
            raise AssertionError("the service did not crash")
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert await w.balance(user, kind=HOLD) == 400
        proc = w.processes["leverage"]
        assert proc.popen is not None and proc.popen.wait(30) == -9
        proc.env.pop("EARN_CRASH_AFTER_HOLD")
        await w.start_leverage()
        w.move(at(0, 22))  # the quote expired more than a minute ago

        async def released() -> None:
            assert await w.balance(user, kind=HOLD) == 0 and await w.balance(user) == 1000

        await eventually(released, timeout=30)
        try:
            await w.lev.SubscribeLeverage(lv.SubscribeLeverageRequest(user_id=user, quote_id=quote.quote_id), metadata=GATEWAY)
            raise AssertionError("an expired quote was accepted")
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "expired" in (err.details() or ""), err.details()
        listed = await w.lev.ListLeveragePositions(lv.ListLeveragePositionsRequest(user_id=user), metadata=GATEWAY)
        assert list(listed.positions) == []
        assert await w.balance(user, kind=HOLD) == 0 and await w.balance(user) == 1000
