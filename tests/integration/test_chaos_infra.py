"""Chaos scenario `mixed` (issue 8): the infrastructure is killed too.

The module starts its OWN PostgreSQL and Kafka broker (services.devstack.infra on free
ports, data in a temporary directory), so it can SIGKILL and restart them without
touching the shared servers. On them run the wallet (its outbox relay as a separate
process), Simple Earn, Launchpool, the market, Crypto Loan, Dual Investment, Smart
Leverage, CandyDrop, HODLer Airdrop, the accrual engine, and the scheduler's CLI with a
file clock.

A seeded mixed workload (EARN_CHAOS_SEED; deposits, Simple Earn subscribe/redeem,
Launchpool stake/unstake, clock advances with scheduler catch-ups that tick and pay,
Crypto Loan borrows against BTC, repayments and collateral added, 7-day fixed-term loans
borrowed a week before (the file clock starts there) and due inside the window (one partly
repaid, one repaid in full early, two settled from their collateral at maturity by the
scheduler's loan.hours, one of them inside the price path), then a seeded BTC/USDT
index path published on market.prices that margin-calls, re-arms and liquidates, Dual
subscriptions and Smart Leverage positions settled at that path's TWAP, one leverage
position redeemed early, a CandyDrop campaign counting the Simple Earn subscriptions of its
registered users, a HODLer airdrop on the ETH the users hold while they stake in
Launchpool) runs twice: calm, then with every one of the wallet, the relay, Simple Earn,
Launchpool, the market, Crypto Loan, Dual, Smart Leverage, CandyDrop, HODLer, the engine,
the scheduler CLI, the Kafka broker and PostgreSQL (the postmaster) SIGKILLed at seeded
moments (each once, plus a few more) and restarted. Every command carries an idempotency key and is retried with the same key until accepted or definitively refused;
a small supervisor restarts any process that exits on its own (as `make run` or
Kubernetes would). After quiescing: per asset the wallet sums to zero and no user
account is negative, every outbox is empty, the same commands were accepted, and every
balance and payout record equals the calm run's (nothing lost, nothing paid twice); every
loan is liquidated at most once, the liquidated loans and the margin calls are the calm
run's, and so is every loan's state, debt, collateral and event record, and every Dual
subscription's settlement. Every fixed-term loan's hourly interest, repayments and
settlement at maturity equal the calm run's and the reference over the accepted commands,
each applied once in the wallet (one transfer per part, the collateral hold captured and
released once). Every leverage position is settled and paid once (one wallet
transfer, none for a zero payout) as in the calm run; before the campaign's distribution
CandyDrop has counted exactly the reference (the accepted subscriptions in its window by
users registered then); every (campaign, user) and (airdrop, user) is paid once, the
expense accounts paid exactly the sum, and every prize and reward equals the calm run's.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from earn.v1 import (accrual_pb2, candydrop_pb2 as cd, candydrop_pb2_grpc, dual_pb2 as du, dual_pb2_grpc, hodler_pb2 as hd, hodler_pb2_grpc,
                     launchpool_pb2 as lp, launchpool_pb2_grpc, leverage_pb2 as lv, leverage_pb2_grpc, loan_pb2 as ln, loan_pb2_grpc,
                     market_pb2 as mk, market_pb2_grpc, simple_earn_pb2 as se, simple_earn_pb2_grpc, wallet_pb2, wallet_pb2_grpc)
from services.devstack.infra import InfraError, Kafka, Postgres, pid_alive, port_in_use
from services.devstack.processes import PROCESSES, ManagedProcess
from services.kernel import events, grpcclient
from services.kernel.topics import CATALOGUE
from services.kernel.clock import set_time
from services.kernel.config import REPO_ROOT, Settings
from services.market import domain as market_domain
from services.market.simulator import tick_envelope
from tests.conftest import GATEWAY, OPERATOR, RELAY, SERVICE, Env, eventually

SEED = int(os.environ.get("EARN_CHAOS_SEED") or random.randrange(1 << 30))
REPLAY = f"EARN_CHAOS_SEED={SEED} .venv/bin/pytest -q -s tests/integration/test_chaos_infra.py (or python -m tests.chaos.run_chaos --seed {SEED} --products mixed)"
H0 = int(datetime(2031, 7, 7, tzinfo=UTC).timestamp()) // 3600
HOURS = 26  # the workload spans day 0 and the first hour of day 1 (one daily payout)
USERS = ("ann", "ben", "cat", "dan")
DEPOSITS = {"BTC": Decimal(10), "USDT": Decimal(10000), "ETH": Decimal(50)}
LP_START, LP_END = 1, 9  # Launchpool project hours
SCHEMAS = ("wallet", "simple_earn", "launchpool", "loan")
# Each of these is SIGKILLed at least once per chaos run, at a seeded moment.
TARGETS = ("wallet", "relay", "simple_earn", "launchpool", "market", "loan", "dual", "leverage", "candydrop", "hodler", "accrual", "scheduler",
           "kafka", "postgres")
# Crypto Loan: borrowers (BTC collateral, USDT borrowed), their loans' actions in hours
# 1-12, then a seeded BTC/USDT index path in hours 14-24 that margin-calls, re-arms and
# liquidates some of them.
LOAN_USERS = ("eve", "fay", "gus", "hal", "ivy", "jon")
LOAN_BTC = Decimal(3)
BTC_START = Decimal(60000)
BTC_DISCOUNT = Decimal("0.95")
# Crypto Loan fixed terms: 7-day loans borrowed a week before the window (the file clock
# starts there, at START), so each one is due inside it: F0 partly repaid, then settled
# from its collateral by loan.hours at the index of hour 0; F1 settled inside the price
# path at the index of its due time; F2 repaid in full before its due time.
FIXED_USERS = ("mia", "ned", "ola")
FIXED_RATE = "0.000006"
TERM_HOURS = 7 * 24
# Dual Investment: a sell-high BTC/USDT plan settled at hour 20 and a buy-low one at hour
# 23 (the TWAP of the index path's 30 minutes before), subscribed by the borrowers in hour 11.
DUAL_PLANS = (("dual-sh", du.DUAL_DIRECTION_SELL_HIGH, 20), ("dual-bl", du.DUAL_DIRECTION_BUY_LOW, 23))
# Smart Leverage: two users quote and subscribe BTC/USDT positions in hours 12-13 (at the
# index of hour 0), maturing inside the price path (settled at its TWAP by the scheduler's
# leverage.settlement); one is redeemed early in hour 18, at the index then.
LEV_USERS = ("kim", "lou")
LEV_PRODUCT = "lev-btc"
LEV_MATURITIES = (16, 19, 22, 24)
# CandyDrop: a campaign in hours 1-10 counting the Simple Earn subscriptions of the users
# registered (from Simple Earn's position events), distributed by candydrop.distribution.
CD_CAMPAIGN, CD_START, CD_END = "candy", 1, 10
CD_TASKS = (("earn-btc", "BTC", "0.5", 3, 20), ("earn-usdt", "USDT", "500", 1, 40))  # task, asset, threshold, candies, max completions
# HODLer: an airdrop on ETH held in hours 2-12 (funding, not what is staked in Launchpool),
# distributed by hodler.distribution once the wallet's postings are published.
HD_AIRDROP, HD_START, HD_END = "hodl", 2, 12
LOG_DIR = Settings().data_dir / "test-logs" / "chaos-mixed"  # kept after the run, for a failing seed
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def _stop_quietly(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """Stop an aiokafka client while the broker may be down or restarting. Its stop()
    can raise CancelledError out of its own fetch task although nothing cancelled this
    one (aio-libs/aiokafka#647): that is swallowed, like any other error of a stop; a
    cancellation of this task goes through."""
    try:
        await asyncio.wait_for(client.stop(), 15)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception:  # noqa: BLE001
        pass


def at(hours: int, minutes: int = 0) -> datetime:
    return datetime.fromtimestamp(H0 * 3600, UTC) + timedelta(hours=hours, minutes=minutes)


def ts(moment: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(moment)
    return t


# ---- the seeded workload -------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    index: int
    hour: int
    minute: int
    kind: str  # deposit, subscribe, redeem, stake, unstake, catch_up, price, borrow, repay, add_collateral, loans_published, dual
    user: str = ""
    target: str = ""  # product (btc / usdt), pool, the loan's label (borrow, repay, add_collateral) or the dual plan
    amount: str = ""  # empty: all of it (redeem, unstake); the index price (price)
    collateral: str = ""  # BTC pledged (borrow, add_collateral); direction/leverage/maturity hour (leverage)


def workload(seed: int) -> list[Command]:
    """Commands valid by construction (funds are only reused from deposits, never from
    redemptions or interest, whose timing differs between runs), in time order."""
    rng = random.Random(seed)
    commands: list[Command] = []

    def add(hour: int, minute: int, kind: str, user: str = "", target: str = "", amount: str = "") -> None:
        commands.append(Command(len(commands), hour, minute, kind, user, target, amount))

    for user in USERS:
        for asset, amount in DEPOSITS.items():
            add(0, 10, "deposit", user, asset, str(amount))
    free = {(u, a): DEPOSITS[a] for u in USERS for a in DEPOSITS}
    held: dict[tuple[str, str], Decimal] = {}  # (user, btc|usdt|pool) -> principal or stake
    asset_of = {"btc": "BTC", "usdt": "USDT", "pool": "ETH"}
    next_catch_up = rng.randint(3, 6)
    for hour in range(HOURS - 1):
        for minute in sorted(rng.sample(range(11, 51), rng.randint(1, 3))):
            user = rng.choice(USERS)
            target = rng.choice(("btc", "usdt", "pool") if LP_START <= hour < LP_END - 1 else ("btc", "usdt"))
            asset = asset_of[target]
            kind = "stake" if target == "pool" else "subscribe"
            current = held.get((user, target), Decimal(0))
            if current and rng.random() < 0.4:  # leave: part or all of it
                part = rng.random() < 0.5
                amount = (current * Decimal(rng.randint(2, 8)) / 10).quantize(Decimal("0.01")) if part else Decimal(0)
                add(hour, minute, "unstake" if kind == "stake" else "redeem", user, target, str(amount) if amount else "")
                held[(user, target)] = current - amount if amount else Decimal(0)
                continue
            amount = (free[(user, asset)] * Decimal(rng.randint(5, 30)) / 100).quantize(Decimal("0.01"))
            if amount >= Decimal("0.1"):
                add(hour, minute, kind, user, target, str(amount))
                free[(user, asset)] -= amount
                held[(user, target)] = current + amount
        if hour + 1 == next_catch_up:
            add(hour + 1, 5, "catch_up")
            next_catch_up += rng.randint(3, 6)
    add(HOURS - 1, 5, "catch_up")
    # Crypto Loan, from its own generator (the commands above do not change with it), in
    # minutes 51-59 of an hour (the others use 5-50); merged in time order.
    merged = sorted([*commands, *loan_workload(seed), *fixed_workload(seed), *dual_workload(seed), *leverage_workload(seed),
                     *distribution_workload(seed)],
                    key=lambda c: (c.hour, c.minute))
    return [replace(c, index=i) for i, c in enumerate(merged)]


def leverage_workload(seed: int) -> list[Command]:
    """USDT deposited, then per user two or three positions quoted and subscribed in hours
    12-13 (long or short, 2-10x, maturing in the path), and P0 redeemed early in hour 18."""
    rng = random.Random(f"{seed}:leverage")
    commands = [Command(-1, 0, 10, "deposit", user, "USDT", "20000") for user in LEV_USERS]
    n = 0
    for user in LEV_USERS:
        for _ in range(rng.randint(2, 3)):
            direction = rng.choice(("long", "short"))
            maturity = LEV_MATURITIES[0] if n == 0 else rng.choice(LEV_MATURITIES)
            commands.append(Command(-1, rng.randint(12, 13), rng.randint(11, 50), "leverage", user, f"P{n}", str(rng.randint(10, 300) * 10),
                                    f"{direction}/{rng.randint(2, 10)}/{maturity}"))
            n += 1
    commands.append(Command(-1, 15, 20, "lev_redeem", commands[len(LEV_USERS)].user, "P0"))
    return commands


def distribution_workload(seed: int) -> list[Command]:
    """CandyDrop registrations (three users before the start, one in hour 4), the barrier
    before the campaign's distribution (every counted subscription counted: the reference)
    and the one before the airdrop's (every wallet posting of its window published)."""
    rng = random.Random(f"{seed}:distribution")
    late = rng.choice(USERS)
    # minute 8 or 10: no other command of these users then (a subscription the consumer
    # read before the registration committed would count for nothing)
    commands = [Command(-1, 4, 8, "register", user, CD_CAMPAIGN) if user == late else Command(-1, 0, 10, "register", user, CD_CAMPAIGN)
                for user in USERS]
    commands.append(Command(-1, CD_END, 1, "candydrop_counted"))
    commands.append(Command(-1, HD_END, 1, "wallet_published"))
    return commands


def dual_strikes(seed: int) -> dict[str, str]:
    rng = random.Random(f"{seed}:dual")
    return {plan: str(rng.randint(44000, 56000)) for plan, _, _ in DUAL_PLANS}


def dual_workload(seed: int) -> list[Command]:
    """Dual subscriptions of the borrowers in hour 11 (after their loans' actions): BTC
    into the sell-high plan (they keep at least 1 BTC out of their loans), USDT (from
    what they borrowed) into the buy-low one."""
    rng = random.Random(f"{seed}:dual-subscriptions")
    commands = []
    for user in LOAN_USERS:
        if rng.random() < 0.7:
            commands.append(Command(-1, 11, rng.randint(51, 59), "dual", user, "dual-sh", rng.choice(("0.1", "0.2", "0.35", "0.5"))))
        if rng.random() < 0.7:
            commands.append(Command(-1, 11, rng.randint(51, 59), "dual", user, "dual-bl", str(rng.randint(5, 40) * 50)))
    return commands


def loan_workload(seed: int) -> list[Command]:
    """A flexible USDT loan per borrower against 0.5-1.5 BTC at 50-69% LTV (under the 70%
    initial LTV at 60,000), partial repayments and collateral added (hours 1-12, only
    lowering the LTV), then, once every loan state is published (the engine reads them
    before any later index tick, in every partition), a BTC/USDT path of ticks in hours
    14-23 around the riskiest loan's margin-call level (calls, re-arms, calls again) and
    a crash that takes it to 92-97%. No loan action runs during the path; the catch-ups
    charge loan interest (the scheduler's loan.hours: the engine charges each started
    hour into every open loan's debt), each one only once the engine has copied the last
    tick into every loan.ltv partition, and the next tick only once the hours it started
    are published: in every partition the engine sees ticks and hours in the same order,
    so its margin calls, re-arms and liquidations (their LTV and debt, interest included)
    are the same in every run of the seed."""
    rng = random.Random(f"{seed}:loan")
    commands: list[Command] = []

    def add(hour: int, minute: int, kind: str, user: str = "", target: str = "", amount: str = "", collateral: str = "") -> None:
        commands.append(Command(-1, hour, minute, kind, user, target, amount, collateral))

    add(0, 10, "price", amount=str(BTC_START))
    for user in LOAN_USERS:
        add(0, 10, "deposit", user, "BTC", str(LOAN_BTC))
    debt: dict[str, Decimal] = {}
    pledged: dict[str, Decimal] = {}
    owner: dict[str, str] = {}
    for n, user in enumerate(LOAN_USERS):
        label = f"L{n}"
        collateral = Decimal(rng.choice(("0.5", "1", "1.5")))
        amount = (collateral * BTC_START * BTC_DISCOUNT * Decimal(rng.randint(50, 69)) / 100).quantize(Decimal("0.01"))
        add(1 + n, rng.randint(51, 59), "borrow", user, label, str(amount), str(collateral))
        debt[label], pledged[label], owner[label] = amount, collateral, user
    for label, user in owner.items():
        hour = 8 + int(label[1:]) // 2
        if rng.random() < 0.5:
            part = (debt[label] * Decimal(rng.randint(5, 40)) / 100).quantize(Decimal("0.01"))
            add(hour, 51, "repay", user, label, str(part))
            debt[label] -= part
        if rng.random() < 0.4:
            more = Decimal(rng.choice(("0.1", "0.25", "0.5")))
            add(hour, 55, "add_collateral", user, label, collateral=str(more))
            pledged[label] += more
    add(13, 51, "loans_published")
    riskiest = max(debt[label] / (pledged[label] * BTC_DISCOUNT) for label in debt)  # debt per counted BTC

    def level(low: int, high: int) -> str:  # the price where the riskiest loan is at low-high % LTV
        return str((riskiest * 100 / rng.randint(low, high)).quantize(Decimal(1)))

    # jitters, a dip that margin-calls the riskiest loans, a recovery that re-arms them,
    # more jitters across the margin-call level, and a crash that liquidates
    path = [level(70, 75), level(72, 78), level(81, 86), level(80, 88), level(74, 77), level(76, 84), level(78, 86), level(72, 78),
            level(80, 87), level(92, 97)]
    for hour, price in zip(range(14, 24), path):
        add(hour, rng.randint(51, 59), "price", amount=price)
    return commands


def fixed_workload(seed: int) -> list[Command]:
    """Fixed-term (7-day) USDT loans against BTC at 30-40% LTV, borrowed a week before
    the window (hours -164 to -147): a tick at 60,000 first, each borrower's BTC and some
    USDT (for the interest) deposited; F0 due in hours 4-8 and partly repaid before, F1
    due in hours 15-21 (inside the price path, far below the riskiest loan's LTV), F2 due
    in hours 9-13 and repaid in full (principal and every hour charged by then) in hours
    2 to its due hour - 2; none of them above 60% LTV at the path's lowest price. F0 and F1 are settled at maturity by the catch-up after their
    due time (the scheduler's loan.hours)."""
    rng = random.Random(f"{seed}:fixed")
    commands = [Command(-1, -TERM_HOURS, 5, "price", amount=str(BTC_START))]
    for user in FIXED_USERS:
        commands += [Command(-1, -TERM_HOURS, 10, "deposit", user, "BTC", "2"), Command(-1, -TERM_HOURS, 10, "deposit", user, "USDT", "100")]
    dues = (rng.randint(4, 8), rng.randint(15, 21), rng.randint(9, 13))
    lowest = min(Decimal(c.amount) for c in loan_workload(seed) if c.kind == "price")  # the crash
    for n, (user, due) in enumerate(zip(FIXED_USERS, dues)):
        label = f"F{n}"
        collateral = Decimal(rng.choice(("0.5", "1", "1.5")))
        amount = (collateral * BTC_START * BTC_DISCOUNT * Decimal(rng.randint(30, 40)) / 100).quantize(Decimal("0.01"))
        # at most 60% LTV at the path's lowest price: never margin-called, also while due and not settled yet
        amount = min(amount, (collateral * lowest * BTC_DISCOUNT * Decimal("0.6")).quantize(Decimal("0.01"), rounding="ROUND_FLOOR"))
        commands.append(Command(-1, due - TERM_HOURS, rng.randint(51, 59), "borrow", user, label, str(amount), str(collateral)))
        if n == 0:
            part = (amount * Decimal(rng.randint(10, 40)) / 100).quantize(Decimal("0.01"))
            commands.append(Command(-1, rng.randint(1, due - 1), rng.randint(51, 59), "repay", user, label, str(part)))
        elif n == 2:
            hour = rng.randint(2, due - 2)
            principal = int(amount * 10**6)  # USDT units
            interest = principal * Fraction(FIXED_RATE) * (hour - (due - TERM_HOURS))  # every hour started after the borrowing's
            debt = principal + interest.numerator // interest.denominator
            commands.append(Command(-1, hour, rng.randint(51, 59), "repay", user, label, str(Decimal(debt) / 10**6)))
    return commands


def fixed_reference(commands: list[Command], accepted: set[int], label: str) -> dict[str, Any]:
    """What a fixed-term loan must come to, computed over the accepted commands by the
    rules (PRODUCT_RULES, README Crypto Loan): every started hour after the borrowing's
    charged on the principal then (floored, remainder carried), a repayment pays
    interest first; a loan open at its due time has every hour started by then charged
    and is settled at the index of the due time without a fee (just enough BTC sold,
    rounded up; the proceeds above the debt paid back, floored)."""
    borrow = next(c for c in commands if c.kind == "borrow" and c.target == label)
    rate = Fraction(FIXED_RATE)
    principal = int(Decimal(borrow.amount) * 10**6)
    pledged = int(Decimal(borrow.collateral) * 10**8)
    through = H0 + borrow.hour  # the borrowing's hour: charged from the next one
    exact, charged, interest = Fraction(0), 0, 0
    out: dict[str, Any] = {"principal": principal, "repays": []}

    def charge(to: int) -> None:
        nonlocal exact, charged, interest, through
        for _ in range(through + 1, to + 1):
            if principal == 0:
                break
            exact += principal * rate
            now = exact.numerator // exact.denominator
            interest += now - charged
            charged = now
        through = max(through, to)

    for c in commands:
        if c.kind == "repay" and c.target == label and c.index in accepted:
            charge(H0 + c.hour)
            paid = int(Decimal(c.amount) * 10**6)
            interest_paid = min(paid, interest)
            interest -= interest_paid
            principal -= paid - interest_paid
            out["repays"].append((c.index, interest_paid, paid - interest_paid))
            if principal == 0 and interest == 0:
                out.update(status="LOAN_STATUS_REPAID", interest_total=charged, returned=pledged)
                return out
    due = at(borrow.hour + TERM_HOURS, borrow.minute)
    charge(H0 + borrow.hour + TERM_HOURS)
    price = Fraction([c for c in commands if c.kind == "price" and at(c.hour, c.minute) <= due][-1].amount)
    debt = principal + interest
    unit_value = price / 100  # USDT units per BTC unit (scales 6 and 8)
    sold = -((-debt * unit_value.denominator) // unit_value.numerator)
    surplus = sold * unit_value - debt
    out.update(status="LOAN_STATUS_MATURED", interest_total=charged, debt=debt, sold=sold, returned=pledged - sold,
               surplus=surplus.numerator // surplus.denominator, price=price)
    return out


def candydrop_reference(commands: list[Command], accepted: set[int], registered: dict[str, datetime]) -> dict[tuple[str, str], Decimal]:
    """(user, task) -> what the campaign counts: the accepted Simple Earn subscriptions in
    its window by users registered by then."""
    out: dict[tuple[str, str], Decimal] = {}
    for c in commands:
        moment = at(c.hour, c.minute)
        if c.kind != "subscribe" or c.index not in accepted or not at(CD_START) <= moment < at(CD_END):
            continue
        if c.user not in registered or moment < registered[c.user]:
            continue
        task = "earn-btc" if c.target == "btc" else "earn-usdt"
        out[(c.user, task)] = out.get((c.user, task), Decimal(0)) + Decimal(c.amount)
    return out


# ---- private infrastructure -----------------------------------------------------------------


@dataclass
class Infra:
    settings: Settings
    postgres: Postgres
    kafka: Kafka
    env: dict[str, str]

    def kill_postgres(self) -> None:
        """SIGKILL the postmaster (its backends die when they notice), then restart it
        through the infra class once the old shared memory is released."""
        pid = self.postgres.pid()
        assert pid is not None, "PostgreSQL is not running"
        backends = _children(pid)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (pid_alive(pid) or any(pid_alive(b) for b in backends)) and time.monotonic() < deadline:
            time.sleep(0.05)
        while True:
            try:
                self.postgres.start()
                return
            except Exception:  # "pre-existing shared memory block is still in use" while backends exit
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def kill_kafka(self) -> None:
        pid = self.kafka.pid()
        assert pid is not None, "Kafka is not running"
        os.killpg(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.05)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.kafka.start()
                return
            except InfraError:  # its port still held by a closing connection
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def server_port() -> int:
    """A free port below the kernel's ephemeral range: while a server is down its clients
    keep reconnecting, and a port from that range can be taken meanwhile by one of their
    outgoing connections (or a TCP self-connect), so the server could not come back."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) if Path("/proc/sys/net/ipv4/ip_local_port_range").exists() else 32768
    while True:
        port = random.randrange(max(1024, low - 12000), low)
        if not port_in_use("127.0.0.1", port):
            return port


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    """Our own PostgreSQL and Kafka on free ports, stopped and deleted at the end."""
    data_dir = Path(tempfile.mkdtemp(prefix="earn-chaos-"))
    data_dir.chmod(0o755)  # as root, PostgreSQL runs as a system user that must reach its data
    settings = Settings(data_dir=data_dir, pg_port=server_port(), kafka_port=server_port(), kafka_controller_port=server_port())
    quiet = lambda _: None  # noqa: E731
    postgres, kafka = Postgres(settings, quiet), Kafka(settings, quiet)
    try:
        postgres.start()
        kafka.start()
        env = {
            **os.environ, "EARN_PG_PORT": str(settings.pg_port), "EARN_KAFKA_PORT": str(settings.kafka_port),
            "EARN_KAFKA_CONTROLLER_PORT": str(settings.kafka_controller_port), "EARN_LOG_LEVEL": "INFO",
        }
        yield Infra(settings, postgres, kafka, env)
    finally:
        kafka.stop(grace=10)
        postgres.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


# ---- one world ------------------------------------------------------------------------------


def _spec(name: str):  # type: ignore[no-untyped-def]
    return RELAY if name == "relay" else next(s for s in PROCESSES if s.name == name)


@dataclass
class World:
    infra: Infra
    clock: Path
    cli_env: dict[str, str]
    processes: dict[str, ManagedProcess]
    wallet: wallet_pb2_grpc.WalletServiceStub
    earn: simple_earn_pb2_grpc.SimpleEarnServiceStub
    launchpool: launchpool_pb2_grpc.LaunchpoolServiceStub
    loan: loan_pb2_grpc.LoanServiceStub
    market: market_pb2_grpc.MarketServiceStub
    dual: dual_pb2_grpc.DualServiceStub
    leverage: leverage_pb2_grpc.LeverageServiceStub
    candydrop: candydrop_pb2_grpc.CandyDropServiceStub
    hodler: hodler_pb2_grpc.HodlerServiceStub
    prices_topic: str
    chaos: random.Random | None = None
    kills: list[str] = field(default_factory=list)
    restarts: list[str] = field(default_factory=list)  # processes that exited on their own
    accepted: list[int] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    paused: bool = False  # the supervisor leaves a process alone while chaos restarts it
    failure: BaseException | None = None
    retries: dict[str, int] = field(default_factory=dict)  # status -> retries of commands
    waited: float = 0.0  # seconds in the barriers (published, forwarded, candydrop_counted)
    loans: dict[str, tuple[str, str]] = field(default_factory=dict)  # loan label -> (user, loan id)
    lev_positions: dict[str, tuple[str, str]] = field(default_factory=dict)  # position label -> (user, position id)
    repaid: dict[str, list[tuple[int, str, str]]] = field(default_factory=dict)  # loan label -> (command, interest paid, principal paid)

    def move(self, moment: datetime) -> None:
        set_time(self.clock, moment)

    async def tick(self, index: int, price: str, moment: datetime) -> None:
        """Publish a BTC/USDT index tick on market.prices as the exchange would (its event
        id derived from the seed's command, so a resend is the same tick), resent until
        the broker has it, then wait until the market serves it."""
        pair = market_domain.parse_pair("BTC/USDT")
        envelope = tick_envelope(pair, Decimal(price), moment, "exchange", uuid.uuid5(uuid.NAMESPACE_URL, f"chaos-mixed:{SEED}:{index}"))
        deadline = time.monotonic() + 180
        while True:
            self.check()
            producer = AIOKafkaProducer(bootstrap_servers=self.infra.settings.kafka_bootstrap, enable_idempotence=True, request_timeout_ms=10000)
            try:
                await asyncio.wait_for(producer.start(), 15)
                await asyncio.wait_for(producer.send_and_wait(self.prices_topic, envelope, key=pair.name.encode()), 20)
                break
            except Exception:  # noqa: BLE001 - the broker is down or restarting: the same tick again
                if time.monotonic() > deadline:
                    raise
                self.retries["tick"] = self.retries.get("tick", 0) + 1
                await asyncio.sleep(1.0)
            finally:
                await _stop_quietly(producer)

        async def served() -> None:
            self.check()
            try:
                reply = await self.market.GetIndex(mk.GetIndexRequest(pair=pair.name), metadata=SERVICE, timeout=10)
            except grpc.aio.AioRpcError as err:
                raise AssertionError(err.details()) from None
            assert reply.event_time.ToDatetime(tzinfo=UTC) >= moment

        await eventually(served, timeout=180)

    async def published(self, schema: str) -> None:
        """Every event ``schema``'s service decided is in Kafka (its outbox is empty). For
        loan: the engine reads every loan state before any index tick published from now
        on; for wallet: every posting so far reached wallet.transfers (HODLer's input)."""
        async def empty() -> None:
            self.check()
            try:
                conn = await asyncpg.connect(self.infra.settings.database_url.rsplit("/", 1)[0] + "/" + self.cli_env["EARN_PG_DATABASE"], timeout=10)
                try:
                    left = await conn.fetchval(f"SELECT count(*) FROM {schema}.outbox")
                finally:
                    await conn.close()
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as err:  # the postmaster killed meanwhile
                raise AssertionError(f"{schema}.outbox: {err!r}") from None
            assert left == 0, f"{left} {schema} events not published yet"

        started = time.monotonic()
        await eventually(empty, timeout=180)
        self.waited += time.monotonic() - started

    async def forwarded(self, index: int) -> None:
        """The engine has copied the tick of command ``index`` into every partition of
        loan.ltv (each copy's id derived from the tick's), so an hour started from now on
        comes after it in every partition, as in the calm run."""
        tick = uuid.uuid5(uuid.NAMESPACE_URL, f"chaos-mixed:{SEED}:{index}")
        partitions = CATALOGUE["loan.ltv"].partitions
        wanted = {str(uuid.uuid5(uuid.NAMESPACE_URL, f"earn-accrual-loan-tick:{tick}:{p}")) for p in range(partitions)}
        topic = self.cli_env["EARN_TOPIC_PREFIX"] + "loan.ltv"

        async def copied() -> None:
            self.check()
            consumer = AIOKafkaConsumer(bootstrap_servers=self.infra.settings.kafka_bootstrap, enable_auto_commit=False, request_timeout_ms=10000)
            seen: set[str] = set()
            try:
                await asyncio.wait_for(consumer.start(), 15)
                parts = [TopicPartition(topic, p) for p in range(partitions)]
                consumer.assign(parts)
                await consumer.seek_to_beginning(*parts)
                ends = await asyncio.wait_for(consumer.end_offsets(parts), 15)
                for tp in parts:
                    while await consumer.position(tp) < ends[tp]:
                        for record in (await asyncio.wait_for(consumer.getmany(tp, timeout_ms=1000), 15)).get(tp, []):
                            seen.add(events.parse(record.value or b"").event_id)
            except Exception as err:  # noqa: BLE001 - the broker is down or restarting: look again
                raise AssertionError(f"loan.ltv: {err!r}") from None
            finally:
                await _stop_quietly(consumer)
            assert wanted <= seen, f"tick {index} copied into {len(wanted & seen)} of {partitions} loan.ltv partitions"

        started = time.monotonic()
        await eventually(copied, timeout=180)
        self.waited += time.monotonic() - started

    async def candydrop_counted(self, expected: dict[tuple[str, str], Decimal]) -> None:
        """CandyDrop has counted every Simple Earn subscription of its window (the
        reference over the accepted commands), before the run that distributes it."""
        async def counted() -> None:
            self.check()
            got: dict[tuple[str, str], Decimal] = {}
            for user in USERS:
                try:
                    reply = await self.candydrop.GetProgress(cd.GetProgressRequest(campaign_id=CD_CAMPAIGN, user_id=user), metadata=GATEWAY, timeout=10)
                except grpc.aio.AioRpcError as err:
                    raise AssertionError(err.details()) from None
                got.update({(user, t.task_id): Decimal(t.progress) for t in reply.tasks if Decimal(t.progress)})
            assert got == expected, (got, expected)

        started = time.monotonic()
        await eventually(counted, timeout=180)
        self.waited += time.monotonic() - started

    async def restart(self, name: str) -> None:
        proc = self.processes[name]
        if proc.running():
            proc.kill()
        proc.start()
        await asyncio.to_thread(proc.wait_ready, 90)

    async def arm_loan_crash(self) -> None:
        """Chaos: the loan service restarted to SIGKILL itself right after the wallet calls of
        its next operation, before it records them (EARN_CRASH_AFTER_WALLET=1); the
        supervisor restarts it without that, and the operation is completed with the same
        wallet keys."""
        proc = self.processes["loan"]
        self.paused = True
        try:
            proc.kill()
            proc.env["EARN_CRASH_AFTER_WALLET"] = "1"
            proc.start()
            await asyncio.to_thread(proc.wait_ready, 90)
        finally:
            proc.env.pop("EARN_CRASH_AFTER_WALLET", None)
            self.paused = False
        self.kills.append("loan(armed)")
        print("mixed: the loan service will kill itself after the wallet calls of its next operation", flush=True)

    async def supervise(self) -> None:
        """Restart any process that exited (a background task that loses its database
        stops its process on purpose; the supervisor brings it back)."""
        while True:
            await asyncio.sleep(0.5)
            if self.paused:
                continue
            for name, proc in self.processes.items():
                if not proc.running():
                    self.restarts.append(f"{name}(exit {proc.returncode})")
                    proc.start()

    async def kill(self, target: str, delay: float) -> None:
        await asyncio.sleep(delay)
        self.kills.append(target)
        print(f"mixed: killing {target}", flush=True)
        started = time.monotonic()
        try:
            if target == "postgres":
                await asyncio.to_thread(self.infra.kill_postgres)
            elif target == "kafka":
                await asyncio.to_thread(self.infra.kill_kafka)
            else:
                self.paused = True
                try:
                    await self.restart(target)
                finally:
                    self.paused = False
        except BaseException as err:
            self.failure = err
            raise
        print(f"mixed: killed and restarted {target} in {time.monotonic() - started:.1f} s", flush=True)

    def check(self) -> None:
        """A failed kill or restart fails the run at once (instead of a stuck workload)."""
        if self.failure is not None:
            raise AssertionError(f"seed {SEED}: killing and restarting failed: {self.failure!r}") from self.failure

    async def call(self, index: int, rpc: Callable[..., Awaitable[Any]], request: Any, metadata: Any) -> Any:
        """Send a command until accepted or definitively refused, always with its key."""
        delay = 0.1
        deadline = time.monotonic() + 180
        while True:
            self.check()
            try:
                reply = await rpc(request, metadata=metadata, timeout=15)
            except grpc.aio.AioRpcError as err:
                if err.code() in RETRIED and time.monotonic() < deadline:
                    self.retries[err.code().name] = self.retries.get(err.code().name, 0) + 1
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                self.refused.append((index, err.code().name))
                print(f"mixed: command {index} refused: {err.code().name} {err.details()}", flush=True)
                return None
            self.accepted.append(index)
            return reply

    async def catch_up(self, final: bool = False) -> None:
        """The scheduler CLI runs every due period; with chaos it may be SIGKILLed mid-run
        (each target is killed by the caller); a failed or killed run is simply rerun,
        as an operator would."""
        for attempt in range(20):
            cli = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.scheduler.cli", "catch-up", cwd=REPO_ROOT, env=self.cli_env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )
            if self.chaos is not None and not final and "scheduler" in self.pending_cli_kill:
                await asyncio.sleep(self.chaos.uniform(0.3, 1.5))
                if cli.returncode is None:  # else it finished first: kill a later run
                    cli.kill()
                    self.pending_cli_kill.remove("scheduler")
                    self.kills.append("scheduler")
                    print("mixed: killed the scheduler CLI", flush=True)
            waiting = asyncio.ensure_future(cli.communicate())
            deadline = time.monotonic() + 240
            while not waiting.done() and time.monotonic() < deadline and self.failure is None:
                await asyncio.wait([waiting], timeout=1)
            if not waiting.done():
                cli.kill()
                await waiting
                self.check()
                continue
            out, _ = waiting.result()
            if cli.returncode == 0:
                return
            if self.chaos is None and "has not caught up" not in out.decode():  # HODLer still reading the wallet's postings: rerun
                raise AssertionError(f"calm catch-up failed:\n{out.decode()[-3000:]}")
            await asyncio.sleep(1.0)
        raise AssertionError("catch-up did not succeed in 20 runs")

    pending_cli_kill: list[str] = field(default_factory=list)


@asynccontextmanager
async def world(infra: Infra, name: str, chaos: random.Random | None = None) -> AsyncIterator[World]:
    database = f"earn_mixed_{name}"
    infra.postgres.ensure_database(database)
    # The devstack server runs with synchronous_commit=off (fast local runs): a SIGKILLed
    # postmaster then loses commits it already acknowledged (a wallet hold a service has
    # recorded, say), which no production database does. This database commits durably
    # (a setting of the database overrides the server's command line); fsync may stay
    # off, as the operating system does not crash here.
    admin = await asyncpg.connect(infra.settings.database_url.rsplit("/", 1)[0] + "/postgres", timeout=10)
    try:
        await admin.execute(f'ALTER DATABASE "{database}" SET synchronous_commit = on')
    finally:
        await admin.close()
    clock = Path(tempfile.mkdtemp(prefix="clock-")) / "now"
    set_time(clock, at(-TERM_HOURS))  # the fixed-term loans are borrowed a week before hour 0
    prefix = f"m{uuid.uuid4().hex[:6]}.{name}."
    env = {"EARN_PG_DATABASE": database, "EARN_TOPIC_PREFIX": prefix, "EARN_CLOCK_FILE": str(clock), "EARN_RELEASE_SWEEP_SECONDS": "1"}
    spawner = Env(infra.settings, infra.env)
    processes: dict[str, ManagedProcess] = {}
    supervisor: asyncio.Task[None] | None = None
    try:
        for process in ("wallet", "relay", "simple_earn", "launchpool", "market", "loan", "dual", "leverage", "candydrop", "hodler", "accrual"):
            extra: dict[str, str] = {}
            if process == "wallet":
                extra = {"EARN_RELAY_ENABLED": "false"}
            elif process == "relay":
                extra = {"EARN_RELAY_SCHEMA": "wallet"}
            elif process in ("simple_earn", "launchpool", "candydrop", "hodler"):
                extra = {"EARN_WALLET_ADDRESS": processes["wallet"].address or ""}
            elif process == "market":
                extra = {"EARN_MAX_GAP_SECONDS": "86400"}
            elif process == "leverage":
                extra = {"EARN_WALLET_ADDRESS": processes["wallet"].address or "", "EARN_MARKET_ADDRESS": processes["market"].address or "",
                         "EARN_MAX_INDEX_AGE_SECONDS": "86400"}
            elif process == "dual":
                extra = {"EARN_WALLET_ADDRESS": processes["wallet"].address or "", "EARN_MARKET_ADDRESS": processes["market"].address or ""}
            elif process == "loan":
                extra = {"EARN_WALLET_ADDRESS": processes["wallet"].address or "", "EARN_MARKET_ADDRESS": processes["market"].address or "",
                         "EARN_MAX_INDEX_AGE_SECONDS": "86400"}
            proc = spawner.spawn(_spec(process), **env, **extra)
            proc.logfile = LOG_DIR / f"{name}-{process}.log"
            proc.logfile.unlink(missing_ok=True)
            proc.start()
            await asyncio.to_thread(proc.wait_ready, 90)
            processes[process] = proc
        cli_env = {
            **infra.env, **env,
            "EARN_SIMPLE_EARN_ADDRESS": processes["simple_earn"].address or "",
            "EARN_LAUNCHPOOL_ADDRESS": processes["launchpool"].address or "",
            "EARN_DUAL_ADDRESS": processes["dual"].address or "",
            "EARN_LOAN_ADDRESS": processes["loan"].address or "",
            "EARN_LEVERAGE_ADDRESS": processes["leverage"].address or "",
            "EARN_CANDYDROP_ADDRESS": processes["candydrop"].address or "",
            "EARN_HODLER_ADDRESS": processes["hodler"].address or "",
            "EARN_SCHEDULER_START": at(0, 10).isoformat(),
            "EARN_METRICS_PORT": "0",
        }
        async with (
            grpcclient.channel(processes["wallet"].address) as c1,
            grpcclient.channel(processes["simple_earn"].address) as c2,
            grpcclient.channel(processes["launchpool"].address) as c3,
            grpcclient.channel(processes["loan"].address) as c4,
            grpcclient.channel(processes["market"].address) as c5,
            grpcclient.channel(processes["dual"].address) as c6,
            grpcclient.channel(processes["leverage"].address) as c7,
            grpcclient.channel(processes["candydrop"].address) as c8,
            grpcclient.channel(processes["hodler"].address) as c9,
        ):
            w = World(infra, clock, cli_env, processes, wallet_pb2_grpc.WalletServiceStub(c1),
                      simple_earn_pb2_grpc.SimpleEarnServiceStub(c2), launchpool_pb2_grpc.LaunchpoolServiceStub(c3),
                      loan_pb2_grpc.LoanServiceStub(c4), market_pb2_grpc.MarketServiceStub(c5), dual_pb2_grpc.DualServiceStub(c6),
                      leverage_pb2_grpc.LeverageServiceStub(c7), candydrop_pb2_grpc.CandyDropServiceStub(c8), hodler_pb2_grpc.HodlerServiceStub(c9),
                      prefix + "market.prices", chaos)
            supervisor = asyncio.create_task(w.supervise())
            yield w
    finally:
        if supervisor is not None:
            supervisor.cancel()
        for proc in reversed(processes.values()):
            proc.stop()
        shutil.rmtree(clock.parent, ignore_errors=True)


# ---- the scenario ---------------------------------------------------------------------------


@dataclass
class Outcome:
    accepted: list[int]
    refused: list[tuple[int, str]]
    balances: dict[tuple[str, str, int], Decimal]  # (owner, asset, kind) -> balance
    records: dict[tuple[str, str], dict[int, Decimal]]  # (user, product or pool) -> boundary -> amount
    loans: dict[str, tuple[Any, ...]]  # loan label -> (status, principal, interest, collateral, events)
    duals: dict[tuple[str, str], tuple[Any, ...]]  # (user, plan) -> (status, amount, settlement price, converted, payout)
    paid: dict[tuple[str, str], tuple[Any, ...]]  # (leverage, label) -> settlement; (candydrop | hodler, user) -> amount


Observed = tuple[dict[tuple[str, str, int], Decimal], dict[tuple[str, str], dict[int, Decimal]], dict[str, tuple[Any, ...]],
                 dict[tuple[str, str], tuple[Any, ...]], dict[tuple[str, str], tuple[Any, ...]]]


def loan_state(loan: ln.Loan, events: list[ln.LoanEventRecord]) -> tuple[Any, ...]:
    """What must equal the calm run's: the state, debt and collateral, and every margin
    call, re-arm and liquidation (its LTV, sales at the index, debt repaid, surplus)."""
    return (
        ln.LoanStatus.Name(loan.status), Decimal(loan.principal), Decimal(loan.interest),
        tuple(sorted((c.asset, Decimal(c.amount)) for c in loan.collateral)),
        tuple((ln.LoanEventKind.Name(e.kind), e.ltv, tuple((s.asset, Decimal(s.sold), Decimal(s.returned), Decimal(s.index_price)) for s in e.sales),
               e.debt_repaid, e.surplus, e.shortfall) for e in events),
    )


async def observe(w: World) -> Observed:
    balances: dict[tuple[str, str, int], Decimal] = {}
    for owner in (*USERS, *LOAN_USERS, *FIXED_USERS, *LEV_USERS, "simple_earn", "launchpool", "loan", "dual", f"leverage.{LEV_PRODUCT}", f"candydrop:{CD_CAMPAIGN}",
                  f"hodler:{HD_AIRDROP}"):
        for b in (await w.wallet.GetBalances(wallet_pb2.GetBalancesRequest(owner=owner), metadata=GATEWAY)).balances:
            if Decimal(b.balance):
                balances[(owner, b.asset, b.kind)] = Decimal(b.balance)
    records: dict[tuple[str, str], dict[int, Decimal]] = {}
    for user in USERS:
        for position in (await w.earn.ListPositions(se.ListPositionsRequest(user_id=user, page_size=100), metadata=GATEWAY)).positions:
            reply = await w.earn.ListInterest(se.ListInterestRequest(user_id=user, position_id=position.position_id, page_size=1000), metadata=GATEWAY)
            got = {r.to_hour: Decimal(r.amount) for r in reply.records if Decimal(r.amount)}
            if got:
                records[(user, position.product_id)] = got
        reply = await w.launchpool.ListRewards(lp.ListRewardsRequest(user_id=user, pool_id="pool", page_size=1000), metadata=GATEWAY)
        got = {r.to_hour: Decimal(r.amount) for r in reply.records if Decimal(r.amount)}
        if got:
            records[(user, "pool")] = got
    loans: dict[str, tuple[Any, ...]] = {}
    for label, (user, loan_id) in sorted(w.loans.items()):
        loan = (await w.loan.GetLoan(ln.GetLoanRequest(user_id=user, loan_id=loan_id), metadata=GATEWAY)).loan
        events = list((await w.loan.ListLoanEvents(ln.ListLoanEventsRequest(user_id=user, loan_id=loan_id), metadata=GATEWAY)).events)
        loans[label] = loan_state(loan, events)
        if label.startswith("F"):  # fixed terms: the due time, every hour's interest, the repayments' amounts
            interest = await w.loan.ListLoanInterest(ln.ListLoanInterestRequest(user_id=user, loan_id=loan_id), metadata=GATEWAY)
            loans[label] += (loan.due_at.ToDatetime(tzinfo=UTC), tuple((r.hour, r.principal, r.amount) for r in interest.records), interest.total,
                             tuple(w.repaid.get(label, ())))
    duals: dict[tuple[str, str], tuple[Any, ...]] = {}
    for user in LOAN_USERS:
        for sub in (await w.dual.ListDualSubscriptions(du.ListDualSubscriptionsRequest(user_id=user, page_size=100), metadata=GATEWAY)).subscriptions:
            st = sub.settlement
            duals[(user, sub.plan_id)] = (du.DualSubscriptionStatus.Name(sub.status), Decimal(sub.amount), st.settlement_price, st.converted,
                                          st.payout_asset, st.payout_amount)
    # Smart Leverage positions (status, settlement), CandyDrop prizes and HODLer rewards.
    paid: dict[tuple[str, str], tuple[Any, ...]] = {}
    for label, (user, position_id) in sorted(w.lev_positions.items()):
        pos = (await w.leverage.GetLeveragePosition(lv.GetLeveragePositionRequest(user_id=user, position_id=position_id), metadata=GATEWAY)).position
        st = pos.settlement
        paid[("leverage", label)] = (lv.LeveragePositionStatus.Name(pos.status), pos.entry_price, pos.breakeven_price, lv.LeverageCloseKind.Name(st.kind),
                                     st.settlement_price, st.payoff, st.payout, st.capped)
    for r in (await w.candydrop.ListPrizes(cd.ListPrizesRequest(campaign_id=CD_CAMPAIGN, page_size=100), metadata=OPERATOR)).prizes:
        paid[("candydrop", r.user_id)] = (r.candies, Decimal(r.amount), bool(r.posting_id))
    for r in (await w.hodler.ListAirdropRewards(hd.ListAirdropRewardsRequest(airdrop_id=HD_AIRDROP, page_size=100), metadata=OPERATOR)).rewards:
        paid[("hodler", r.user_id)] = (r.counted_average, Decimal(r.amount), bool(r.posting_id))
    return balances, records, loans, duals, paid


async def check_paid_once(w: World, paid: dict[tuple[str, str], tuple[Any, ...]]) -> None:
    """Every leverage position settled, the campaign's and the airdrop's users each paid
    once (one wallet transfer of each, none for a zero amount), and their expense
    accounts paid exactly the sum."""
    refs: dict[str, list[str]] = {}
    for owner in (*USERS, *LOAN_USERS, *LEV_USERS):
        listed = await w.wallet.ListTransfers(wallet_pb2.ListTransfersRequest(owner=owner, page_size=1000), metadata=OPERATOR)
        refs[owner] = [t.reference for t in listed.transfers if t.destination.owner == owner]
    for (kind, key), record in paid.items():
        if kind == "leverage":
            user, position_id = w.lev_positions[key]
            assert record[0] == "LEVERAGE_POSITION_STATUS_SETTLED", (key, record)
            assert refs[user].count(f"leverage:settlement:{LEV_PRODUCT}:{position_id}") == (1 if Decimal(record[6]) else 0), (key, record, refs[user])
        else:
            reference = f"candydrop:prize:{CD_CAMPAIGN}" if kind == "candydrop" else f"hodler:reward:{HD_AIRDROP}"
            assert refs[key].count(reference) == (1 if record[1] else 0) and record[2] == bool(record[1]), (kind, key, record, refs[key])
    for kind, owner in (("candydrop", f"candydrop:{CD_CAMPAIGN}"), ("hodler", f"hodler:{HD_AIRDROP}")):
        total = sum((r[1] for (k, _), r in paid.items() if k == kind), Decimal(0))
        assert total > 0, f"the {kind} distribution paid nothing: {paid}"
        expense = sum((Decimal(b.balance) for b in (await w.wallet.GetBalances(wallet_pb2.GetBalancesRequest(owner=owner), metadata=OPERATOR)).balances
                       if b.kind == wallet_pb2.ACCOUNT_KIND_EXPENSE), Decimal(0))
        assert expense == -total, (kind, expense, total)


async def check_fixed(w: World, commands: list[Command], loans: dict[str, tuple[Any, ...]]) -> None:
    """Every fixed-term loan as the reference over the accepted commands computes it
    (fixed_reference): its interest hour by hour, each repayment's interest and
    principal, its status, and for a matured loan its one MATURITY event (BTC sold at the
    index of its due time, debt repaid, surplus); and each applied once in the wallet:
    one borrow transfer, one transfer per repaid part, one surplus transfer (none for a
    zero surplus), and its collateral hold captured (the part sold, into the desk's
    treasury) and released (the rest) once each, nothing left held."""
    accepted = set(w.accepted)
    conn = await asyncpg.connect(w.infra.settings.database_url.rsplit("/", 1)[0] + "/" + w.cli_env["EARN_PG_DATABASE"], timeout=10)
    try:
        holds = {label: [str(h) for h in await conn.fetchval("SELECT array_agg(hold_id ORDER BY hold_id) FROM loan.loan_holds WHERE loan_id = $1",
                                                              w.loans[label][1])] for label in w.loans if label.startswith("F")}
    finally:
        await conn.close()
    assert len(holds) == len(FIXED_USERS), (holds, w.loans)
    usdt = lambda units: Decimal(units) / 10**6  # noqa: E731
    btc = lambda units: Decimal(units) / 10**8  # noqa: E731
    for label, hold_ids in sorted(holds.items()):
        user, loan_id = w.loans[label]
        ref = fixed_reference(commands, accepted, label)
        state = loans[label]
        status, principal, interest, collateral, events, _due, hours, total, repays = state
        assert status == ref["status"] and principal == 0 and interest == 0 and collateral == (("BTC", Decimal(0)),), (label, state, ref)
        assert Decimal(total) == usdt(ref["interest_total"]) == sum((Decimal(h[2]) for h in hours), Decimal(0)), (label, total, ref)
        assert [(i, Decimal(a), Decimal(b)) for i, a, b in repays] == [(i, usdt(a), usdt(b)) for i, a, b in ref["repays"]], (label, repays, ref)
        listed = (await w.wallet.ListTransfers(wallet_pb2.ListTransfersRequest(owner=user, page_size=1000), metadata=OPERATOR)).transfers
        by_ref: dict[str, list[tuple[str, int, Decimal]]] = {}
        for t in listed:
            by_ref.setdefault(t.reference, []).append((t.destination.owner, t.destination.kind, Decimal(t.amount)))
        assert by_ref.get(f"loan:borrow:{loan_id}") == [(user, wallet_pb2.ACCOUNT_KIND_FUNDING, usdt(ref["principal"]))], (label, by_ref)
        parts = [("loan", wallet_pb2.ACCOUNT_KIND_FEE_INCOME, usdt(a)) for _, a, _ in ref["repays"] if a] + \
                [("loan", wallet_pb2.ACCOUNT_KIND_TREASURY, usdt(b)) for _, _, b in ref["repays"] if b]
        assert sorted(by_ref.get(f"loan:repay:{loan_id}", [])) == sorted(parts), (label, by_ref, ref)
        sold, returned = ref.get("sold", 0), ref["returned"]
        moves = [m for h in hold_ids for m in by_ref.get(f"hold:{h}", [])]
        expected = ([("loan", wallet_pb2.ACCOUNT_KIND_TREASURY, btc(sold))] if sold else []) + \
                   ([(user, wallet_pb2.ACCOUNT_KIND_FUNDING, btc(returned))] if returned else [])
        assert sorted(moves) == sorted(expected), (label, moves, expected)
        for h in hold_ids:
            hold = (await w.wallet.GetHold(wallet_pb2.GetHoldRequest(hold_id=h), metadata=OPERATOR)).hold
            assert Decimal(hold.remaining) == 0 and hold.status == wallet_pb2.HOLD_STATUS_CLOSED, (label, hold)
        surplus = by_ref.get(f"loan:maturity:{loan_id}", [])
        if ref["status"] == "LOAN_STATUS_MATURED":
            assert [e[0] for e in events] == ["LOAN_EVENT_KIND_MATURITY"], (label, events)
            _, _, sales, debt_repaid, surplus_text, shortfall = events[0]
            assert sales == (("BTC", btc(sold), btc(returned), Decimal(ref["price"].numerator) / ref["price"].denominator),), (label, sales, ref)
            assert (Decimal(debt_repaid), Decimal(surplus_text), Decimal(shortfall)) == (usdt(ref["debt"]), usdt(ref["surplus"]), 0), (label, events, ref)
            assert surplus == ([(user, wallet_pb2.ACCOUNT_KIND_FUNDING, usdt(ref["surplus"]))] if ref["surplus"] else []), (label, surplus, ref)
        else:
            assert not events and not surplus, (label, events, surplus)


async def check_invariants(w: World) -> None:
    totals = await w.wallet.GetLedgerTotals(wallet_pb2.GetLedgerTotalsRequest(), metadata=OPERATOR, timeout=15)
    assert totals.totals, "no ledger totals"
    for total in totals.totals:
        assert Decimal(total.sum) == 0 and total.negative_user_accounts == 0, total
    conn = await asyncpg.connect(w.infra.settings.database_url.rsplit("/", 1)[0] + "/" + w.cli_env["EARN_PG_DATABASE"], timeout=10)
    try:
        for schema in SCHEMAS:
            left = await conn.fetchval(f"SELECT count(*) FROM {schema}.outbox")
            assert left == 0, f"{left} unpublished events in {schema}.outbox"
        # loan.hours started every hour of the run for the engine (each once)
        hours = await conn.fetchval("SELECT array_agg(hour ORDER BY hour) FROM loan.loan_hours")
        assert hours == list(range(H0 + 1, H0 + HOURS)), hours
    finally:
        await conn.close()


async def scenario(w: World, commands: list[Command], reference: Outcome | None = None) -> Outcome:
    # Operator set-up (retried like every command): two Simple Earn products and a
    # Launchpool project paying hourly.
    await w.call(-1, w.earn.CreateProduct, se.CreateProductRequest(
        idempotency_key="product-btc", product_id="btc", asset="BTC", kind=se.PRODUCT_KIND_FLEXIBLE, min_subscription="0.001",
        tiers=[accrual_pb2.RateTier(up_to="5", apr="0.08"), accrual_pb2.RateTier(up_to="", apr="0.02")],
        payout_cadence=se.PAYOUT_CADENCE_DAILY), OPERATOR)
    await w.call(-2, w.earn.CreateProduct, se.CreateProductRequest(
        idempotency_key="product-usdt", product_id="usdt", asset="USDT", kind=se.PRODUCT_KIND_FLEXIBLE, min_subscription="0.001",
        tiers=[accrual_pb2.RateTier(up_to="", apr="0.1")], payout_cadence=se.PAYOUT_CADENCE_HOURLY), OPERATOR)
    await w.call(-3, w.launchpool.CreateProject, lp.CreateProjectRequest(
        idempotency_key="project", project_id="project", reward_asset="USDT", start_time=ts(at(LP_START)), end_time=ts(at(LP_END)),
        payout_mode=lp.LAUNCHPOOL_PAYOUT_MODE_HOURLY,
        pools=[lp.RewardPoolSpec(pool_id="pool", stake_asset="ETH", total_reward="800", min_stake="0.01", max_stake="1000")]), OPERATOR)
    # Crypto Loan: USDT lent at a small hourly rate against BTC (counted 95%), the desk's
    # treasury funded from outside.
    await w.call(-4, w.loan.SetLoanAsset, ln.SetLoanAssetRequest(idempotency_key="loan-usdt", asset=ln.LoanAsset(
        asset="USDT", hourly_rate="0.000005", fixed_7_days_hourly_rate=FIXED_RATE, min_borrow="10", max_borrow="1000000")), OPERATOR)
    await w.call(-5, w.loan.SetLoanCollateralAsset, ln.SetLoanCollateralAssetRequest(idempotency_key="loan-btc", collateral=ln.LoanCollateralAsset(
        asset="BTC", discount=str(BTC_DISCOUNT))), OPERATOR)
    await w.call(-6, w.wallet.Transfer, wallet_pb2.TransferRequest(idempotency_key="loan-treasury", transfer=wallet_pb2.TransferSpec(
        asset="USDT", source=wallet_pb2.AccountRef(owner="loan", kind=wallet_pb2.ACCOUNT_KIND_EXTERNAL),
        destination=wallet_pb2.AccountRef(owner="loan", kind=wallet_pb2.ACCOUNT_KIND_TREASURY), amount="1000000")), OPERATOR)
    strikes = dual_strikes(SEED)
    for n, (plan, direction, hour) in enumerate(DUAL_PLANS):
        await w.call(-7 - n, w.dual.CreateDualPlan, du.CreateDualPlanRequest(
            idempotency_key=plan, plan_id=plan, base_asset="BTC", quote_asset="USDT", direction=direction, strike=strikes[plan], apr="0.3",
            settlement_time=ts(at(hour)), min_amount="0.01", max_per_user="1000000", quota="10000000"), OPERATOR)
    for asset, amount in (("BTC", "20"), ("USDT", "1000000")):
        await w.call(-9, w.wallet.Transfer, wallet_pb2.TransferRequest(idempotency_key=f"dual-treasury-{asset}", transfer=wallet_pb2.TransferSpec(
            asset=asset, source=wallet_pb2.AccountRef(owner="dual", kind=wallet_pb2.ACCOUNT_KIND_EXTERNAL),
            destination=wallet_pb2.AccountRef(owner="dual", kind=wallet_pb2.ACCOUNT_KIND_TREASURY), amount=amount)), OPERATOR)
    # Smart Leverage: a BTC/USDT product (its treasury funded from outside).
    await w.call(-10, w.leverage.CreateLeverageProduct, lv.CreateLeverageProductRequest(
        idempotency_key="lev-product", product_id=LEV_PRODUCT, pair="BTC/USDT", max_leverage="10", fee_rate="0.005", min_principal="10",
        max_principal="100000"), OPERATOR)
    await w.call(-11, w.wallet.Transfer, wallet_pb2.TransferRequest(idempotency_key="lev-treasury", transfer=wallet_pb2.TransferSpec(
        asset="USDT", source=wallet_pb2.AccountRef(owner=f"leverage.{LEV_PRODUCT}", kind=wallet_pb2.ACCOUNT_KIND_EXTERNAL),
        destination=wallet_pb2.AccountRef(owner=f"leverage.{LEV_PRODUCT}", kind=wallet_pb2.ACCOUNT_KIND_TREASURY), amount="1000000")), OPERATOR)
    # CandyDrop: a pro-rata USDT campaign with a per-user cap; HODLer: a USDT airdrop on ETH.
    await w.call(-12, w.candydrop.CreateCampaign, cd.CreateCampaignRequest(
        idempotency_key="campaign", campaign_id=CD_CAMPAIGN, prize_asset="USDT", prize_pool="1000", pool_kind=cd.PRIZE_POOL_KIND_PRO_RATA,
        per_user_cap="400", start_time=ts(at(CD_START)), end_time=ts(at(CD_END)),
        tasks=[cd.CandyTask(task_id=task, kind=cd.CANDY_TASK_KIND_SIMPLE_EARN_SUBSCRIPTION, asset=asset, threshold=threshold, candies=candies,
                            max_completions=limit) for task, asset, threshold, candies, limit in CD_TASKS]), OPERATOR)
    await w.call(-13, w.hodler.CreateAirdrop, hd.CreateAirdropRequest(
        idempotency_key="airdrop", airdrop_id=HD_AIRDROP, hold_asset="ETH", reward_asset="USDT", total="500", start_hour=H0 + HD_START,
        end_hour=H0 + HD_END, min_average="0.5", per_user_cap="45"), OPERATOR)
    positions: dict[tuple[str, str], str] = {}
    registered: dict[str, datetime] = {}
    last_tick: int | None = None
    # Chaos: every target once at a seeded command (some during catch-ups, while ticks and
    # payouts run), the scheduler CLI at a seeded catch-up, plus a few more kills.
    kill_at: dict[int, list[str]] = {}
    crash_at = -1
    if w.chaos is not None:
        catch_ups = [c.index for c in commands if c.kind == "catch_up"][:-1]
        targets = [t for t in TARGETS if t != "scheduler"] + [w.chaos.choice(TARGETS) for _ in range(2)]
        for index, target in zip(w.chaos.sample([c.index for c in commands[:-1]], len(targets)), targets):
            kill_at.setdefault(index, []).append(target)
        kill_at.setdefault(w.chaos.choice(catch_ups), []).append("scheduler")
        # Fixed terms: the catch-up that settles F0 at maturity (the first after its due hour
        # started) starts with a loan service that kills itself right after the wallet calls
        # of its next operation (F0's settlement), before recording it; and the loan service
        # or the wallet is SIGKILLed during the one that settles F1.
        settling = {label: next(c.index for c in commands if c.kind == "catch_up" and c.hour > borrow.hour + TERM_HOURS)
                    for label in ("F0", "F1") for borrow in [next(c for c in commands if c.kind == "borrow" and c.target == label)]}
        if "loan" not in kill_at.get(settling["F0"], []):
            crash_at = settling["F0"]
        kill_at.setdefault(settling["F1"], []).append("wallet" if settling["F1"] == crash_at else w.chaos.choice(("loan", "wallet")))
    killing: asyncio.Task[None] | None = None

    for c in commands:
        w.move(at(c.hour, c.minute))
        if c.index == crash_at:
            if killing is not None:
                await killing
            await w.arm_loan_crash()
        for target in kill_at.get(c.index, []):
            if target == "scheduler":
                w.pending_cli_kill.append("scheduler")
                continue
            if killing is not None:
                await killing
            assert w.chaos is not None
            # Commands take milliseconds: a short delay lands the kill while this one is in
            # flight (and the next ones meet the restart); during catch-ups, mid-run.
            delay = w.chaos.uniform(0.3, 3.0) if c.kind == "catch_up" else w.chaos.uniform(0, 0.03)
            killing = asyncio.create_task(w.kill(target, delay))
        key = f"c{c.index}"
        if c.kind == "deposit":
            await w.call(c.index, w.wallet.Deposit, wallet_pb2.DepositRequest(idempotency_key=key, owner=c.user, asset=c.target, amount=c.amount), OPERATOR)
        elif c.kind == "subscribe":
            reply = await w.call(c.index, w.earn.Subscribe, se.SubscribeRequest(idempotency_key=key, user_id=c.user, product_id=c.target, amount=c.amount), GATEWAY)
            if reply is not None:
                positions[(c.user, c.target)] = reply.position.position_id
        elif c.kind == "redeem":
            await w.call(c.index, w.earn.Redeem, se.RedeemRequest(idempotency_key=key, user_id=c.user, position_id=positions.get((c.user, c.target), ""), amount=c.amount), GATEWAY)
        elif c.kind == "stake":
            await w.call(c.index, w.launchpool.Stake, lp.StakeRequest(idempotency_key=key, user_id=c.user, pool_id="pool", amount=c.amount), GATEWAY)
        elif c.kind == "unstake":
            await w.call(c.index, w.launchpool.Unstake, lp.UnstakeRequest(idempotency_key=key, user_id=c.user, pool_id="pool", amount=c.amount), GATEWAY)
        elif c.kind == "catch_up":
            # loan.hours: the hours it starts reach every loan.ltv partition after the last
            # tick and before the next (the engine's LTV decisions then see them in the calm
            # run's order)
            if last_tick is not None:
                await w.forwarded(last_tick)
            await w.catch_up()
            await w.published("loan")
        elif c.kind == "price":
            await w.tick(c.index, c.amount, at(c.hour, c.minute))
            last_tick = c.index
        elif c.kind == "borrow":
            reply = await w.call(c.index, w.loan.Borrow, ln.BorrowRequest(
                idempotency_key=key, user_id=c.user, loan_asset="USDT", amount=c.amount,
                collateral=[ln.LoanCollateralAmount(asset="BTC", amount=c.collateral)],
                term=ln.LOAN_TERM_FIXED_7_DAYS if c.target.startswith("F") else ln.LOAN_TERM_FLEXIBLE), GATEWAY)
            if reply is not None:
                w.loans[c.target] = (c.user, reply.loan.loan_id)
        elif c.kind == "repay":
            reply = await w.call(c.index, w.loan.RepayLoan, ln.RepayLoanRequest(
                idempotency_key=key, user_id=c.user, loan_id=w.loans.get(c.target, ("", ""))[1], amount=c.amount), GATEWAY)
            if reply is not None:  # the first answer or a replay by key: the amounts decided with it
                w.repaid.setdefault(c.target, []).append((c.index, reply.interest_paid, reply.principal_paid))
        elif c.kind == "add_collateral":
            await w.call(c.index, w.loan.AddLoanCollateral, ln.AddLoanCollateralRequest(
                idempotency_key=key, user_id=c.user, loan_id=w.loans.get(c.target, ("", ""))[1],
                collateral=ln.LoanCollateralAmount(asset="BTC", amount=c.collateral)), GATEWAY)
        elif c.kind == "dual":
            await w.call(c.index, w.dual.SubscribeDual, du.SubscribeDualRequest(
                client_order_id=key, user_id=c.user, plan_id=c.target, amount=c.amount), GATEWAY)
        elif c.kind == "loans_published":
            await w.published("loan")
        elif c.kind == "leverage":
            direction, leverage, maturity = c.collateral.split("/")
            quote = await w.call(c.index, w.leverage.RequestLeverageQuote, lv.RequestLeverageQuoteRequest(
                idempotency_key=key, user_id=c.user, product_id=LEV_PRODUCT, leverage=leverage, principal=c.amount, maturity=ts(at(int(maturity))),
                direction=lv.LEVERAGE_DIRECTION_LONG if direction == "long" else lv.LEVERAGE_DIRECTION_SHORT), GATEWAY)
            if quote is not None:
                w.accepted.remove(c.index)  # one command: accepted once subscribed
                reply = await w.call(c.index, w.leverage.SubscribeLeverage, lv.SubscribeLeverageRequest(user_id=c.user, quote_id=quote.quote.quote_id), GATEWAY)
                if reply is not None:
                    w.lev_positions[c.target] = (c.user, reply.position.position_id)
        elif c.kind == "lev_redeem":
            await w.call(c.index, w.leverage.RedeemLeverageEarly, lv.RedeemLeverageEarlyRequest(
                idempotency_key=key, user_id=c.user, position_id=w.lev_positions.get(c.target, ("", ""))[1]), GATEWAY)
        elif c.kind == "register":
            reply = await w.call(c.index, w.candydrop.Register, cd.RegisterRequest(idempotency_key=key, user_id=c.user, campaign_id=c.target), GATEWAY)
            if reply is not None:
                registered[c.user] = at(c.hour, c.minute)
        elif c.kind == "candydrop_counted":
            await w.candydrop_counted(candydrop_reference(commands, set(w.accepted), registered))
        elif c.kind == "wallet_published":
            await w.published("wallet")
    if killing is not None:
        await killing

    # Quiesce: everything up (the supervisor restarts what exited), one more complete
    # catch-up, then the invariants and the comparison until consistent.
    for proc in w.processes.values():
        if proc.spec.port_env:
            await asyncio.to_thread(proc.wait_ready, 90)
    if last_tick is not None:
        await w.forwarded(last_tick)
    await w.catch_up(final=True)
    outcome: Outcome | None = None

    async def consistent() -> None:
        nonlocal outcome
        await check_invariants(w)
        balances, records, loans, duals, paid = await observe(w)
        # Settled: the same a moment later (a payout still in flight would change it; the
        # calm run has no reference to wait for, so it must not be read mid-payout).
        await asyncio.sleep(2)
        assert (balances, records, loans, duals, paid) == await observe(w), "still moving"
        await check_paid_once(w, paid)
        await check_fixed(w, commands, loans)
        for label, state in loans.items():  # liquidated at most once, and then closed
            kinds = [e[0] for e in state[4]]
            assert kinds.count("LOAN_EVENT_KIND_LIQUIDATION") <= 1, (label, kinds)
            assert ("LOAN_EVENT_KIND_LIQUIDATION" in kinds) == (state[0] == "LOAN_STATUS_LIQUIDATED"), (label, state)
        outcome = Outcome(sorted(w.accepted), sorted(w.refused), balances, records, loans, duals, paid)
        if reference is not None:
            assert outcome.accepted == reference.accepted and outcome.refused == reference.refused, "accepted commands differ"
            if outcome.loans != reference.loans:
                diff_l = {k: (outcome.loans.get(k), reference.loans.get(k)) for k in sorted(set(outcome.loans) | set(reference.loans))
                          if outcome.loans.get(k) != reference.loans.get(k)}
                print("mixed: loans differ from the calm run, (chaos, calm):", diff_l, flush=True)
            liquidated = lambda loans: {k for k, v in loans.items() if v[0] == "LOAN_STATUS_LIQUIDATED"}  # noqa: E731
            assert liquidated(outcome.loans) == liquidated(reference.loans), "liquidated loans differ"
            calls = lambda loans: {k: [e for e in v[4] if e[0] == "LOAN_EVENT_KIND_MARGIN_CALL"] for k, v in loans.items()}  # noqa: E731
            assert calls(outcome.loans) == calls(reference.loans), "margin calls differ"
            assert outcome.loans == reference.loans, "loan states or records differ"
            if outcome.duals != reference.duals:
                print("mixed: dual subscriptions differ from the calm run, (chaos, calm):",
                      {k: (outcome.duals.get(k), reference.duals.get(k)) for k in set(outcome.duals) | set(reference.duals)
                       if outcome.duals.get(k) != reference.duals.get(k)}, flush=True)
            assert outcome.duals == reference.duals, "dual subscriptions or settlements differ"
            if outcome.paid != reference.paid:
                print("mixed: leverage settlements, prizes or airdrop rewards differ from the calm run, (chaos, calm):",
                      {k: (outcome.paid.get(k), reference.paid.get(k)) for k in set(outcome.paid) | set(reference.paid)
                       if outcome.paid.get(k) != reference.paid.get(k)}, flush=True)
            assert outcome.paid == reference.paid, "leverage settlements, CandyDrop prizes or HODLer rewards differ"
            if outcome.balances != reference.balances or outcome.records != reference.records:
                diff_b = {k: (outcome.balances.get(k), reference.balances.get(k)) for k in set(outcome.balances) | set(reference.balances) if outcome.balances.get(k) != reference.balances.get(k)}
                diff_r = {}
                for k in set(outcome.records) | set(reference.records):
                    a, b = outcome.records.get(k, {}), reference.records.get(k, {})
                    d = {h: (a.get(h), b.get(h)) for h in set(a) | set(b) if a.get(h) != b.get(h)}
                    if d:
                        diff_r[k] = d
                print("mixed: differs from the calm run, (chaos, calm): balances", diff_b, "records", diff_r, flush=True)
            assert outcome.balances == reference.balances, sorted(set(outcome.balances.items()) ^ set(reference.balances.items()))[:8]
            assert outcome.records == reference.records, "payout records differ"

    await eventually(consistent, timeout=90)
    assert outcome is not None
    return outcome


@pytest.fixture(scope="module")
async def calm(infra: Infra) -> Outcome:
    print(f"mixed: seed {SEED}; replay: {REPLAY}", flush=True)
    started = time.monotonic()
    async with world(infra, "calm") as w:
        outcome = await scenario(w, workload(SEED))
    print(f"mixed: calm run in {time.monotonic() - started:.0f} s (waiting for the barriers {w.waited:.0f} s)", flush=True)
    assert not outcome.refused, f"seed {SEED}: the calm run refused {outcome.refused}"
    assert any(product == "pool" for _, product in outcome.records), "the workload paid no Launchpool reward"
    assert len(outcome.loans) == len(LOAN_USERS) + len(FIXED_USERS), outcome.loans
    assert sum(1 for v in outcome.loans.values() if v[0] == "LOAN_STATUS_MATURED") == 2, outcome.loans
    assert any(state[0] == "LOAN_STATUS_LIQUIDATED" for state in outcome.loans.values()), f"seed {SEED}: the price path liquidated no loan"
    assert outcome.duals and all(d[0] == "DUAL_SUBSCRIPTION_STATUS_SETTLED" for d in outcome.duals.values()), outcome.duals
    assert sum(1 for k in outcome.paid if k[0] == "leverage") >= 4, outcome.paid
    print("mixed: calm leverage, prizes and rewards", {k: (v[5:7] if k[0] == "leverage" else v[:2]) for k, v in sorted(outcome.paid.items())}, flush=True)
    print("mixed: calm dual", {k: (d[2], d[3], d[4], d[5]) for k, d in sorted(outcome.duals.items())}, flush=True)
    print("mixed: calm loans", {k: (v[0], [e[0].removeprefix("LOAN_EVENT_KIND_") for e in v[4]]) for k, v in outcome.loans.items()}, flush=True)
    print("mixed: calm fixed terms (due, interest, repaid (command, interest, principal), settled (sold, debt repaid, surplus))",
          {k: (v[5].strftime("%d %H:%M"), v[7], v[8], [(e[2][0][1], e[3], e[4]) for e in v[4]]) for k, v in outcome.loans.items() if k.startswith("F")},
          flush=True)
    return outcome


@pytest.mark.timeout(900)
async def test_mixed_chaos_kills_services_broker_and_database_and_loses_nothing(infra: Infra, calm: Outcome) -> None:
    print(f"chaos seed {SEED}; replay: {REPLAY}")
    started = time.monotonic()
    try:
        async with world(infra, "chaos", random.Random(SEED)) as w:
            got = await scenario(w, workload(SEED), reference=calm)
            print(f"mixed: chaos run in {time.monotonic() - started:.0f} s (waiting for the barriers {w.waited:.0f} s)", flush=True)
            print(f"mixed chaos seed {SEED}: killed {w.kills}; exited on their own and restarted: {w.restarts}; command retries: {w.retries}")
            assert set(TARGETS) <= set(w.kills), f"not every target was killed: {w.kills}"
            if "loan(armed)" in w.kills:
                assert "loan(exit -9)" in w.restarts, f"the loan service never killed itself after its wallet calls: {w.restarts}"
    except BaseException:
        print(f"mixed chaos FAILED for seed {SEED}; replay: {REPLAY}")
        raise
    assert got == calm
