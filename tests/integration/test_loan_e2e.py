"""Crypto Loan end to end, through gRPC and Kafka only: the wallet, the market, the loan
service and the accrual engine as processes; index ticks published on market.prices as
the exchange would; the engine joins them with the open loans and the loan service
records its margin calls and executes its liquidations.

Checked to the unit against a reference written here with fractions (independently of
services.loan.domain): a multi-collateral loan (BTC counted 95%, ETH 90%) borrowed at
exactly the initial LTV, one unit more refused; collateral removal refused when it would
breach the initial LTV; a price path that crosses the margin-call level, jitters (no
second call), recovers below the re-arm band, crosses again (a second call); a repayment
during the margin call (interest first, then principal; it takes the loan under the
re-arm line, so the engine re-arms it on the debt change); then a crash that liquidates:
collateral sold at the index less the fee, just enough, the surplus paid back, the rest
of the collateral returned; hourly interest into the debt and a full repayment that
returns all collateral. Balances of users, the desk's treasury and fee income are checked.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import asyncpg
import grpc
from services.kernel import grpcclient
import pytest
from aiokafka import AIOKafkaProducer

from earn.v1 import loan_pb2 as ln, loan_pb2_grpc, market_pb2 as mk, market_pb2_grpc, wallet_pb2 as wp, wallet_pb2_grpc
from services.devstack.processes import PROCESSES, ManagedProcess
from services.kernel.clock import set_time
from services.kernel.config import REPO_ROOT
from services.market import domain as market_domain
from services.market.simulator import tick_envelope
from tests.conftest import GATEWAY, OPERATOR, SERVICE, eventually, unique

pytestmark = pytest.mark.integration

H0 = datetime(2031, 9, 1, tzinfo=UTC)
FUNDING, HOLD, TREASURY, EXTERNAL, FEE = (wp.ACCOUNT_KIND_FUNDING, wp.ACCOUNT_KIND_HOLD, wp.ACCOUNT_KIND_TREASURY,
                                         wp.ACCOUNT_KIND_EXTERNAL, wp.ACCOUNT_KIND_FEE_INCOME)
RATE = "0.000005"


def at(minutes: float) -> datetime:
    return H0 + timedelta(minutes=minutes)


def floor_to(value: Fraction, scale: int) -> Decimal:
    v = value * 10**scale
    return Decimal(v.numerator // v.denominator).scaleb(-scale)


def ceil_to(value: Fraction, scale: int) -> Decimal:
    v = value * 10**scale
    return Decimal(-((-v.numerator) // v.denominator)).scaleb(-scale)


def _spec(name: str):  # type: ignore[no-untyped-def]
    return next(s for s in PROCESSES if s.name == name)


@dataclass
class World:
    clock: Path
    loan: loan_pb2_grpc.LoanServiceStub
    market: market_pb2_grpc.MarketServiceStub
    wallet: wallet_pb2_grpc.WalletServiceStub
    producer: AIOKafkaProducer
    topic: str
    processes: dict[str, ManagedProcess]
    database: str = ""
    prefix: str = ""

    async def tick(self, pair: str, price: str, moment: datetime) -> None:
        p = market_domain.parse_pair(pair)
        await self.producer.send_and_wait(self.topic, tick_envelope(p, Decimal(price), moment, "exchange", uuid.uuid4()), key=pair.encode())

        async def arrived() -> None:
            try:
                reply = await self.market.GetIndex(mk.GetIndexRequest(pair=pair), metadata=SERVICE)
            except grpc.aio.AioRpcError as err:
                raise AssertionError(err.details()) from None
            assert reply.event_time.ToDatetime(tzinfo=UTC) >= moment

        await eventually(arrived, timeout=30)

    async def open_desk(self, treasury: str, collateral: tuple[tuple[str, str], ...] = (("BTC", "0.95"),), **rates: str) -> None:
        """The operator's set-up: USDT to borrow (at RATE, ``rates`` for the fixed terms),
        the collateral assets with their discounts, ``treasury`` USDT in the desk's treasury."""
        await self.loan.SetLoanAsset(ln.SetLoanAssetRequest(idempotency_key=unique(), asset=ln.LoanAsset(
            asset="USDT", hourly_rate=RATE, min_borrow="10", max_borrow="1000000", **rates)), metadata=OPERATOR)
        for asset, discount in collateral:
            await self.loan.SetLoanCollateralAsset(ln.SetLoanCollateralAssetRequest(idempotency_key=unique(), collateral=ln.LoanCollateralAsset(
                asset=asset, discount=discount)), metadata=OPERATOR)
        await self.wallet.Transfer(wp.TransferRequest(idempotency_key=unique(), transfer=wp.TransferSpec(
            asset="USDT", source=wp.AccountRef(owner="loan", kind=EXTERNAL), destination=wp.AccountRef(owner="loan", kind=TREASURY),
            amount=treasury)), metadata=OPERATOR)

    async def balance(self, owner: str, asset: str, kind: int = FUNDING) -> Decimal:
        reply = await self.wallet.GetBalances(wp.GetBalancesRequest(owner=owner, asset=asset), metadata=OPERATOR)
        return sum((Decimal(b.balance) for b in reply.balances if b.kind == kind), Decimal(0))

    async def events(self, user: str, loan_id: str) -> list[ln.LoanEventRecord]:
        return list((await self.loan.ListLoanEvents(ln.ListLoanEventsRequest(user_id=user, loan_id=loan_id), metadata=GATEWAY)).events)

    async def wait_events(self, user: str, loan_id: str, kinds: list[int]) -> list[ln.LoanEventRecord]:
        async def check() -> None:
            assert [e.kind for e in await self.events(user, loan_id)] == kinds

        await eventually(check, timeout=60)
        return await self.events(user, loan_id)


@asynccontextmanager
async def world(stack, name: str, engine_env: dict[str, str] | None = None, *, engine: bool = True,  # type: ignore[no-untyped-def]
                loan_env: dict[str, str] | None = None) -> AsyncIterator[World]:
    database = f"{stack.settings.pg_database}_{name}"
    admin = await asyncpg.connect(stack.settings.database_url.rsplit("/", 1)[0] + "/postgres")
    await admin.execute(f'CREATE DATABASE "{database}"')
    clock = Path(tempfile.mkdtemp(prefix="clock-")) / "now"
    set_time(clock, at(10))
    prefix = f"{stack.settings.topic_prefix}{name}."
    env = {"EARN_PG_DATABASE": database, "EARN_TOPIC_PREFIX": prefix, "EARN_CLOCK_FILE": str(clock)}
    processes: dict[str, ManagedProcess] = {}
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_idempotence=True)
    try:
        for process in ("wallet", "market"):
            processes[process] = stack.spawn(_spec(process), **env, **({"EARN_MAX_GAP_SECONDS": "86400"} if process == "market" else {}))
            processes[process].start()
        for proc in processes.values():
            await asyncio.to_thread(proc.wait_ready, 60)
        processes["loan"] = stack.spawn(_spec("loan"), **env, EARN_WALLET_ADDRESS=processes["wallet"].address or "",
                                        EARN_MARKET_ADDRESS=processes["market"].address or "", EARN_MAX_INDEX_AGE_SECONDS="86400", **(loan_env or {}))
        processes["loan"].start()
        await asyncio.to_thread(processes["loan"].wait_ready, 60)
        if engine:
            processes["accrual"] = stack.spawn(_spec("accrual"), **env, **(engine_env or {}))
            processes["accrual"].start()
            await asyncio.to_thread(processes["accrual"].wait_ready, 60)
        await producer.start()
        async with (
            grpcclient.channel(processes["loan"].address) as c1,
            grpcclient.channel(processes["market"].address) as c2,
            grpcclient.channel(processes["wallet"].address) as c3,
        ):
            yield World(clock, loan_pb2_grpc.LoanServiceStub(c1), market_pb2_grpc.MarketServiceStub(c2), wallet_pb2_grpc.WalletServiceStub(c3),
                        producer, prefix + "market.prices", processes, database, prefix)
    finally:
        await producer.stop()
        for proc in reversed(processes.values()):
            proc.stop()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


async def refused(call, request, code: grpc.StatusCode, text: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(request, metadata=GATEWAY)
    assert err.value.code() == code, err.value.details()
    assert text in (err.value.details() or ""), err.value.details()


async def test_loan_end_to_end(stack) -> None:  # type: ignore[no-untyped-def]
    async with world(stack, "loan") as w:
        await w.open_desk("1000000", (("BTC", "0.95"), ("ETH", "0.9")), fixed_7_days_hourly_rate="0.000006")
        for user, asset, amount in (("alice", "BTC", "1"), ("alice", "ETH", "10"), ("alice", "USDT", "1"), ("bob", "BTC", "1"), ("carol", "BTC", "1")):
            await w.wallet.Deposit(wp.DepositRequest(idempotency_key=unique(), owner=user, asset=asset, amount=amount), metadata=OPERATOR)
        await w.tick("BTC/USDT", "60000", at(9))
        await w.tick("ETH/USDT", "3000", at(9))

        # multi-collateral at exactly 70%: 1 BTC x 60,000 x 0.95 + 10 ETH x 3,000 x 0.9 = 84,000; 70% = 58,800
        coll = [ln.LoanCollateralAmount(asset="BTC", amount="1"), ln.LoanCollateralAmount(asset="ETH", amount="10")]
        await refused(w.loan.Borrow, ln.BorrowRequest(idempotency_key=unique(), user_id="alice", loan_asset="USDT", amount="58800.000001",
                                                      collateral=coll, term=ln.LOAN_TERM_FLEXIBLE), grpc.StatusCode.FAILED_PRECONDITION, "initial LTV")
        assert await w.balance("alice", "BTC") == 1 and await w.balance("alice", "USDT") == 1
        request = ln.BorrowRequest(idempotency_key=unique(), user_id="alice", loan_asset="USDT", amount="58800", collateral=coll,
                                   term=ln.LOAN_TERM_FLEXIBLE)
        alice = (await w.loan.Borrow(request, metadata=GATEWAY)).loan
        assert (await w.loan.Borrow(request, metadata=GATEWAY)).loan == alice  # the same key: the same answer
        assert alice.ltv == "0.7" and alice.principal == "58800" and alice.interest == "0"
        assert await w.balance("alice", "USDT") == Decimal("58801") and await w.balance("alice", "BTC") == 0
        assert await w.balance("alice", "ETH", HOLD) == 10

        # bob: 39,900 on 1 BTC (57,000 counted): 70%
        bob = (await w.loan.Borrow(ln.BorrowRequest(idempotency_key=unique(), user_id="bob", loan_asset="USDT", amount="39900",
                                                    collateral=[ln.LoanCollateralAmount(asset="BTC", amount="1")], term=ln.LOAN_TERM_FLEXIBLE),
                                   metadata=GATEWAY)).loan
        assert bob.ltv == "0.7"
        await refused(w.loan.RemoveLoanCollateral, ln.RemoveLoanCollateralRequest(
            idempotency_key=unique(), user_id="bob", loan_id=bob.loan_id, collateral=ln.LoanCollateralAmount(asset="BTC", amount="0.00000001")),
            grpc.StatusCode.FAILED_PRECONDITION, "initial LTV")
        assert await w.balance("bob", "BTC", HOLD) == 1

        # margin call at 39,900 / (0.8 x 0.95) = 52,500; re-armed under 79%: above 53,164.56...
        await w.tick("BTC/USDT", "52400", at(11))
        await w.wait_events("bob", bob.loan_id, [ln.LOAN_EVENT_KIND_MARGIN_CALL])
        await w.tick("BTC/USDT", "52600", at(12))  # jitter above the level, below the re-arm line: nothing
        await w.tick("BTC/USDT", "52450", at(13))
        await w.tick("BTC/USDT", "53200", at(14))  # 39,900 / 50,540 = 78.9%: re-armed
        await w.wait_events("bob", bob.loan_id, [ln.LOAN_EVENT_KIND_MARGIN_CALL, ln.LOAN_EVENT_KIND_REARMED])
        await w.tick("BTC/USDT", "52500", at(15))  # exactly 80%: called again
        calls = await w.wait_events("bob", bob.loan_id, [ln.LOAN_EVENT_KIND_MARGIN_CALL, ln.LOAN_EVENT_KIND_REARMED, ln.LOAN_EVENT_KIND_MARGIN_CALL])
        assert calls[2].ltv == "0.8" and calls[0].ltv == str(Decimal(round(Fraction(39900) / (Fraction(52400) * Fraction(95, 100)) * 10**6)).scaleb(-6))
        assert [e.kind for e in await w.events("alice", alice.loan_id)] == []  # alice: 76,780 counted, 76.6%

        # repay during the margin call: 1,000 USDT, no interest yet (the first hour is H0+1h)
        repaid = await w.loan.RepayLoan(ln.RepayLoanRequest(idempotency_key=unique(), user_id="bob", loan_id=bob.loan_id, amount="1000"),
                                        metadata=GATEWAY)
        assert (repaid.interest_paid, repaid.principal_paid, repaid.loan.principal) == ("0", "1000", "38900")
        # 38,900 / 49,875 = 78.0%: the repayment took bob under the re-arm line; the engine re-arms on the debt change
        await w.wait_events("bob", bob.loan_id, [ln.LOAN_EVENT_KIND_MARGIN_CALL, ln.LOAN_EVENT_KIND_REARMED,
                                                 ln.LOAN_EVENT_KIND_MARGIN_CALL, ln.LOAN_EVENT_KIND_REARMED])

        # the crash: 45,000. bob 38,900 / 42,750 = 91.0%: liquidated; alice 58,800 / 69,750 = 84.3%: a margin call
        await w.tick("BTC/USDT", "45000", at(16))
        events = await w.wait_events("bob", bob.loan_id, [ln.LOAN_EVENT_KIND_MARGIN_CALL, ln.LOAN_EVENT_KIND_REARMED,
                                                           ln.LOAN_EVENT_KIND_MARGIN_CALL, ln.LOAN_EVENT_KIND_REARMED,
                                                           ln.LOAN_EVENT_KIND_MARGIN_CALL, ln.LOAN_EVENT_KIND_LIQUIDATION])
        unit = Fraction(45000) * Fraction(98, 100)  # USDT per BTC sold
        sold = ceil_to(Fraction(38900) / unit, 8)
        surplus = floor_to(Fraction(sold) * unit - 38900, 6)
        liq = events[5]
        assert (liq.sales[0].asset, Decimal(liq.sales[0].sold), Decimal(liq.sales[0].returned)) == ("BTC", sold, 1 - sold)
        assert (Decimal(liq.debt_repaid), Decimal(liq.surplus), Decimal(liq.shortfall)) == (38900, surplus, 0)
        got = (await w.loan.GetLoan(ln.GetLoanRequest(user_id="bob", loan_id=bob.loan_id), metadata=GATEWAY)).loan
        assert got.status == ln.LOAN_STATUS_LIQUIDATED and got.principal == "0"
        assert await w.balance("bob", "BTC") == 1 - sold and await w.balance("bob", "BTC", HOLD) == 0
        assert await w.balance("bob", "USDT") == Decimal(39900 - 1000) + surplus
        await w.wait_events("alice", alice.loan_id, [ln.LOAN_EVENT_KIND_MARGIN_CALL])

        # an hour of interest: hour H0+1h started (the scheduler's job loan.hours), 58,800 x 0.000005 = 0.294
        set_time(w.clock, at(70))
        env = {**stack.env, "EARN_PG_DATABASE": w.database, "EARN_TOPIC_PREFIX": w.prefix, "EARN_CLOCK_FILE": str(w.clock),
               "EARN_LOAN_ADDRESS": w.processes["loan"].address or "", "EARN_SCHEDULER_START": at(10).isoformat(), "EARN_METRICS_PORT": "0"}
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "services.scheduler.cli", "catch-up", "--job", "loan.hours"],
                                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        got = (await w.loan.GetLoan(ln.GetLoanRequest(user_id="alice", loan_id=alice.loan_id), metadata=GATEWAY)).loan
        assert got.interest == "0" and got.principal == "58800"  # stored state; the interest enters at the next change
        records = await w.loan.ListLoanInterest(ln.ListLoanInterestRequest(user_id="alice", loan_id=alice.loan_id), metadata=GATEWAY)
        assert [(r.principal, r.amount) for r in records.records] == [("58800", "0.294")] and records.total == "0.294"
        # full repayment: interest first, then principal; all collateral back
        full = await w.loan.RepayLoan(ln.RepayLoanRequest(idempotency_key=unique(), user_id="alice", loan_id=alice.loan_id, amount="58800.294"),
                                      metadata=GATEWAY)
        assert (full.interest_paid, full.principal_paid, full.loan.status) == ("0.294", "58800", ln.LOAN_STATUS_REPAID)
        assert await w.balance("alice", "BTC") == 1 and await w.balance("alice", "ETH") == 10
        assert await w.balance("alice", "USDT") == Decimal("0.706")
        assert await w.balance("loan", "USDT", FEE) == Decimal("0.294")
        assert await w.balance("loan", "BTC", TREASURY) == sold
        assert await w.balance("loan", "USDT", TREASURY) == Decimal(1000000 - 39900 + 1000) - surplus
        totals = await w.wallet.GetLedgerTotals(wp.GetLedgerTotalsRequest(), metadata=OPERATOR)
        assert all(Decimal(t.sum) == 0 for t in totals.totals), totals


async def test_engine_killed_during_a_crash_liquidates_each_loan_once(stack) -> None:  # type: ignore[no-untyped-def]
    """40 loans of 1 BTC each; BTC falls from 60,000 to 30,000 in one tick while the engine
    is SIGKILLed (twice, at seeded moments) and restarted: every loan at or over 90% is
    liquidated exactly once (one record, the sold BTC in the desk's treasury equal to the
    reference's sum), every loan between 80% and 90% gets one margin call, the others none."""
    import os
    import random

    seed = int(os.environ.get("EARN_CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"EARN_CHAOS_SEED={seed}")
    async with world(stack, "loankill") as w:
        await w.open_desk("2000000")
        await w.tick("BTC/USDT", "60000", at(9))
        loans: dict[str, tuple[str, int]] = {}
        for i in range(40):
            user, debt = f"k{i:02d}", 20_000 + 490 * i
            await w.wallet.Deposit(wp.DepositRequest(idempotency_key=unique(), owner=user, asset="BTC", amount="1"), metadata=OPERATOR)
            loan = (await w.loan.Borrow(ln.BorrowRequest(idempotency_key=unique(), user_id=user, loan_asset="USDT", amount=str(debt),
                                                         collateral=[ln.LoanCollateralAmount(asset="BTC", amount="1")],
                                                         term=ln.LOAN_TERM_FLEXIBLE), metadata=GATEWAY)).loan
            loans[loan.loan_id] = (user, debt)
        engine = w.processes["accrual"]
        p = market_domain.parse_pair("BTC/USDT")
        await w.producer.send_and_wait(w.topic, tick_envelope(p, Decimal("30000"), at(20), "exchange", uuid.uuid4()), key=b"BTC/USDT")
        for _ in range(2):
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            engine.kill()
            engine.start()
            await asyncio.to_thread(engine.wait_ready, 60)
        counted = Fraction(30000) * Fraction(95, 100)
        unit = Fraction(30000) * Fraction(98, 100)
        expected_sold = Decimal(0)
        for loan_id, (user, debt) in sorted(loans.items()):
            ltv = Fraction(debt) / counted
            kinds = ([ln.LOAN_EVENT_KIND_MARGIN_CALL] if ltv >= Fraction(8, 10) else []) + ([ln.LOAN_EVENT_KIND_LIQUIDATION] if ltv >= Fraction(9, 10) else [])
            events = await w.wait_events(user, loan_id, kinds)
            if ltv >= Fraction(9, 10):
                sold = min(Decimal(1), ceil_to(Fraction(debt) / unit, 8))
                expected_sold += sold
                proceeds = Fraction(sold) * unit
                liq = events[-1]
                assert Decimal(liq.sales[0].sold) == sold, (loan_id, liq)
                if proceeds >= debt:
                    assert (Decimal(liq.debt_repaid), Decimal(liq.surplus), Decimal(liq.shortfall)) == (debt, floor_to(proceeds - debt, 6), 0)
                else:
                    assert (Decimal(liq.debt_repaid), Decimal(liq.surplus)) == (floor_to(proceeds, 6), 0)
                    assert Decimal(liq.shortfall) == debt - floor_to(proceeds, 6)
        await asyncio.sleep(2)  # anything re-sent after the restarts has arrived by now: still one liquidation each
        for loan_id, (user, debt) in sorted(loans.items()):
            kinds = [e.kind for e in await w.events(user, loan_id)]
            assert kinds.count(ln.LOAN_EVENT_KIND_LIQUIDATION) <= 1 and kinds.count(ln.LOAN_EVENT_KIND_MARGIN_CALL) <= 1, (loan_id, kinds)
        assert await w.balance("loan", "BTC", TREASURY) == expected_sold
        totals = await w.wallet.GetLedgerTotals(wp.GetLedgerTotalsRequest(), metadata=OPERATOR)
        assert all(Decimal(t.sum) == 0 for t in totals.totals), totals


async def test_fixed_term_loan_is_settled_from_collateral_at_its_due_time_once(stack) -> None:  # type: ignore[no-untyped-def]
    """A 7-day loan not repaid by its due time: the scheduler's loan.hours job of the first
    hour after it settles the debt (every hour started by the due time charged) from the
    collateral at the index of the due time, without a fee; the surplus is paid back, the
    rest of the collateral returned; once (the job again changes nothing). A 30-day loan
    is not due yet and stays open."""
    async with world(stack, "loanmature") as w:
        await w.open_desk("1000000", fixed_7_days_hourly_rate="0.000006", fixed_30_days_hourly_rate="0.000007")
        for user in ("dave", "erin"):
            await w.wallet.Deposit(wp.DepositRequest(idempotency_key=unique(), owner=user, asset="BTC", amount="1"), metadata=OPERATOR)
        await w.tick("BTC/USDT", "60000", at(9))
        one_btc = [ln.LoanCollateralAmount(asset="BTC", amount="1")]
        dave = (await w.loan.Borrow(ln.BorrowRequest(idempotency_key=unique(), user_id="dave", loan_asset="USDT", amount="30000",
                                                     collateral=one_btc, term=ln.LOAN_TERM_FIXED_7_DAYS), metadata=GATEWAY)).loan
        erin = (await w.loan.Borrow(ln.BorrowRequest(idempotency_key=unique(), user_id="erin", loan_asset="USDT", amount="20000",
                                                     collateral=one_btc, term=ln.LOAN_TERM_FIXED_30_DAYS), metadata=GATEWAY)).loan
        due = at(10) + timedelta(days=7)
        assert dave.due_at.ToDatetime(tzinfo=UTC) == due and dave.hourly_rate == "0.000006"

        # the due time passes; the index at the due time is 49,999 (a later tick is not used)
        set_time(w.clock, due + timedelta(minutes=45))
        await w.tick("BTC/USDT", "49999", due - timedelta(minutes=1))
        await w.tick("BTC/USDT", "45000", due + timedelta(minutes=30))
        env = {**stack.env, "EARN_PG_DATABASE": w.database, "EARN_TOPIC_PREFIX": w.prefix, "EARN_CLOCK_FILE": str(w.clock),
               "EARN_LOAN_ADDRESS": w.processes["loan"].address or "", "EARN_SCHEDULER_START": due.isoformat(), "EARN_METRICS_PORT": "0"}

        async def catch_up() -> None:
            done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "services.scheduler.cli", "catch-up", "--job", "loan.hours"],
                                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr

        # before the first hour after the due time has started: nothing to run, the loan is open
        await catch_up()
        assert (await w.loan.GetLoan(ln.GetLoanRequest(user_id="dave", loan_id=dave.loan_id), metadata=GATEWAY)).loan.status == ln.LOAN_STATUS_OPEN
        set_time(w.clock, due + timedelta(minutes=55))  # hour H0 + 7 d + 1 h has started
        await catch_up()

        # 7 x 24 hours (H0+1h .. H0+7d, the last started at the due time's hour) of 30,000 x 0.000006 = 0.18
        debt = Fraction(30000) + 168 * Fraction(18, 100)
        sold = ceil_to(debt / 49999, 8)
        surplus = floor_to(Fraction(sold) * 49999 - debt, 6)
        got = (await w.loan.GetLoan(ln.GetLoanRequest(user_id="dave", loan_id=dave.loan_id), metadata=GATEWAY)).loan
        assert got.status == ln.LOAN_STATUS_MATURED and got.principal == "0" and got.interest == "0"
        events = await w.wait_events("dave", dave.loan_id, [ln.LOAN_EVENT_KIND_MATURITY])
        m = events[0]
        assert [(s.asset, Decimal(s.sold), Decimal(s.returned), Decimal(s.index_price)) for s in m.sales] == [("BTC", sold, 1 - sold, 49999)]
        assert (Decimal(m.debt_repaid), Decimal(m.surplus), Decimal(m.shortfall)) == (Decimal(debt.numerator) / debt.denominator, surplus, 0)
        records = await w.loan.ListLoanInterest(ln.ListLoanInterestRequest(user_id="dave", loan_id=dave.loan_id), metadata=GATEWAY)
        assert len(records.records) == 168 and records.total == "30.24"
        assert await w.balance("dave", "BTC") == 1 - sold and await w.balance("dave", "BTC", HOLD) == 0
        assert await w.balance("dave", "USDT") == 30000 + surplus
        assert await w.balance("loan", "BTC", TREASURY) == sold
        assert await w.balance("loan", "USDT", TREASURY) == 1000000 - 30000 - 20000 - surplus

        # once: the hour again (the job's call, by hand) and the job's next hour change nothing
        await w.loan.StartLoanHour(ln.StartLoanHourRequest(hour=int((due + timedelta(minutes=55)).timestamp()) // 3600), metadata=SERVICE)
        set_time(w.clock, due + timedelta(minutes=115))
        await w.tick("BTC/USDT", "45000", due + timedelta(minutes=110))
        await catch_up()
        assert [e.kind for e in await w.events("dave", dave.loan_id)] == [ln.LOAN_EVENT_KIND_MATURITY]
        assert await w.balance("loan", "BTC", TREASURY) == sold
        assert (await w.loan.GetLoan(ln.GetLoanRequest(user_id="erin", loan_id=erin.loan_id), metadata=GATEWAY)).loan.status == ln.LOAN_STATUS_OPEN
        assert await w.balance("erin", "BTC", HOLD) == 1
        totals = await w.wallet.GetLedgerTotals(wp.GetLedgerTotalsRequest(), metadata=OPERATOR)
        assert all(Decimal(t.sum) == 0 for t in totals.totals), totals


async def test_an_overdue_fixed_term_loan_stops_growing_in_the_engine_at_its_due_time(stack) -> None:  # type: ignore[no-untyped-def]
    """A 7-day loan whose settlement at maturity cannot run (no index within a day of its
    due time: the hour job's call fails and is retried) stays open past its due time. The
    engine, like the service, charges it only the hours started by the due time: hours a
    day later add nothing to its debt, so a price at which that post-due interest would
    cross 80% calls nothing, and the margin call at a lower price carries the LTV of the
    due-time debt."""
    async with world(stack, "loanoverdue") as w:
        await w.open_desk("1000000", fixed_7_days_hourly_rate="0.000006")
        await w.wallet.Deposit(wp.DepositRequest(idempotency_key=unique(), owner="fay", asset="BTC", amount="1"), metadata=OPERATOR)
        await w.tick("BTC/USDT", "60000", at(9))
        fay = (await w.loan.Borrow(ln.BorrowRequest(idempotency_key=unique(), user_id="fay", loan_asset="USDT", amount="30000",
                                                    collateral=[ln.LoanCollateralAmount(asset="BTC", amount="1")],
                                                    term=ln.LOAN_TERM_FIXED_7_DAYS), metadata=GATEWAY)).loan
        due = at(10) + timedelta(days=7)
        due_hour = int(due.timestamp()) // 3600
        assert fay.due_at.ToDatetime(tzinfo=UTC) == due

        # a day after the due time: the hours start (HourClosed reaches the engine), the settlement fails on the stale index
        set_time(w.clock, due + timedelta(days=1, minutes=5))
        for hour in (due_hour + 1, due_hour + 24):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await w.loan.StartLoanHour(ln.StartLoanHourRequest(hour=hour), metadata=SERVICE)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "retry later" in (err.value.details() or ""), err.value.details()
        got = (await w.loan.GetLoan(ln.GetLoanRequest(user_id="fay", loan_id=fay.loan_id), metadata=GATEWAY)).loan
        assert got.status == ln.LOAN_STATUS_OPEN

        # 168 hours (H0+1h .. H0+7d) of 30,000 x 0.000006 = 0.18: 30,030.24 at and after the due time (30,034.56 with 24 hours more)
        debt = Fraction(30000) + 168 * Fraction(18, 100)
        counted_1, counted_2 = Fraction(39516) * Fraction(95, 100), Fraction(39500) * Fraction(95, 100)
        assert debt / counted_1 < Fraction(8, 10) <= (debt + 24 * Fraction(18, 100)) / counted_1
        await w.tick("BTC/USDT", "39516", due + timedelta(days=1, minutes=1))  # no call: post-due interest is not charged
        await w.tick("BTC/USDT", "39500", due + timedelta(days=1, minutes=2))  # 80.03% of the due-time debt: one call
        events = await w.wait_events("fay", fay.loan_id, [ln.LOAN_EVENT_KIND_MARGIN_CALL])
        assert events[0].ltv == str(Decimal(round(debt / counted_2 * 10**6)).scaleb(-6)), events[0].ltv
        await asyncio.sleep(2)  # anything later has arrived by now: still the one call
        assert [e.kind for e in await w.events("fay", fay.loan_id)] == [ln.LOAN_EVENT_KIND_MARGIN_CALL]
        got = (await w.loan.GetLoan(ln.GetLoanRequest(user_id="fay", loan_id=fay.loan_id), metadata=GATEWAY)).loan
        assert got.status == ln.LOAN_STATUS_OPEN
