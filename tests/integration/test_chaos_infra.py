"""Chaos scenario `mixed` (issue 8): the infrastructure is killed too.

The module starts its OWN PostgreSQL and Kafka broker (services.devstack.infra on free
ports, data in a temporary directory), so it can SIGKILL and restart them without
touching the shared servers. On them run the wallet (its outbox relay as a separate
process), Simple Earn, Launchpool, the accrual engine, and the scheduler's CLI with a
file clock.

A seeded mixed workload (EARN_CHAOS_SEED; deposits, Simple Earn subscribe/redeem,
Launchpool stake/unstake, clock advances with scheduler catch-ups that tick and pay) runs
twice: calm, then with every one of the wallet, the relay, Simple Earn, Launchpool, the
engine, the scheduler CLI, the Kafka broker and PostgreSQL (the postmaster) SIGKILLed at
seeded moments (each once, plus a few more) and restarted. Every command carries an
idempotency key and is retried with the same key until accepted or definitively refused;
a small supervisor restarts any process that exits on its own (as `make run` or
Kubernetes would). After quiescing: per asset the wallet sums to zero and no user
account is negative, every outbox is empty, the same commands were accepted, and every
balance and payout record equals the calm run's (nothing lost, nothing paid twice).
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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from earn.v1 import accrual_pb2, launchpool_pb2 as lp, launchpool_pb2_grpc, simple_earn_pb2 as se, simple_earn_pb2_grpc, wallet_pb2, wallet_pb2_grpc
from services.devstack.infra import InfraError, Kafka, Postgres, pid_alive, port_in_use
from services.devstack.processes import PROCESSES, ManagedProcess
from services.kernel import grpcclient
from services.kernel.clock import set_time
from services.kernel.config import REPO_ROOT, Settings
from tests.conftest import GATEWAY, OPERATOR, RELAY, Env, eventually

SEED = int(os.environ.get("EARN_CHAOS_SEED") or random.randrange(1 << 30))
REPLAY = f"EARN_CHAOS_SEED={SEED} .venv/bin/pytest -q -s tests/integration/test_chaos_infra.py (or python -m tests.chaos.run_chaos --seed {SEED} --products mixed)"
H0 = int(datetime(2031, 7, 7, tzinfo=UTC).timestamp()) // 3600
HOURS = 26  # the workload spans day 0 and the first hour of day 1 (one daily payout)
USERS = ("ann", "ben", "cat", "dan")
DEPOSITS = {"BTC": Decimal(10), "USDT": Decimal(10000), "ETH": Decimal(50)}
LP_START, LP_END = 1, 9  # Launchpool project hours
SCHEMAS = ("wallet", "simple_earn", "launchpool")
# Each of these is SIGKILLed at least once per chaos run, at a seeded moment.
TARGETS = ("wallet", "relay", "simple_earn", "launchpool", "accrual", "scheduler", "kafka", "postgres")
LOG_DIR = Settings().data_dir / "test-logs" / "chaos-mixed"  # kept after the run, for a failing seed
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


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
    kind: str  # deposit, subscribe, redeem, stake, unstake, catch_up
    user: str = ""
    target: str = ""  # product (btc / usdt) or pool
    amount: str = ""  # empty: all of it (redeem, unstake)


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
    return commands


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
    chaos: random.Random | None = None
    kills: list[str] = field(default_factory=list)
    restarts: list[str] = field(default_factory=list)  # processes that exited on their own
    accepted: list[int] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    paused: bool = False  # the supervisor leaves a process alone while chaos restarts it
    failure: BaseException | None = None
    retries: dict[str, int] = field(default_factory=dict)  # status -> retries of commands

    def move(self, moment: datetime) -> None:
        set_time(self.clock, moment)

    async def restart(self, name: str) -> None:
        proc = self.processes[name]
        if proc.running():
            proc.kill()
        proc.start()
        await asyncio.to_thread(proc.wait_ready, 90)

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
            if self.chaos is None:
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
    set_time(clock, at(0, 10))
    prefix = f"m{uuid.uuid4().hex[:6]}.{name}."
    env = {"EARN_PG_DATABASE": database, "EARN_TOPIC_PREFIX": prefix, "EARN_CLOCK_FILE": str(clock), "EARN_RELEASE_SWEEP_SECONDS": "1"}
    spawner = Env(infra.settings, infra.env)
    processes: dict[str, ManagedProcess] = {}
    supervisor: asyncio.Task[None] | None = None
    try:
        for process in ("wallet", "relay", "simple_earn", "launchpool", "accrual"):
            extra: dict[str, str] = {}
            if process == "wallet":
                extra = {"EARN_RELAY_ENABLED": "false"}
            elif process == "relay":
                extra = {"EARN_RELAY_SCHEMA": "wallet"}
            elif process in ("simple_earn", "launchpool"):
                extra = {"EARN_WALLET_ADDRESS": processes["wallet"].address or ""}
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
            "EARN_SCHEDULER_START": at(0, 10).isoformat(),
            "EARN_METRICS_PORT": "0",
        }
        async with (
            grpcclient.channel(processes["wallet"].address) as c1,
            grpcclient.channel(processes["simple_earn"].address) as c2,
            grpcclient.channel(processes["launchpool"].address) as c3,
        ):
            w = World(infra, clock, cli_env, processes, wallet_pb2_grpc.WalletServiceStub(c1),
                      simple_earn_pb2_grpc.SimpleEarnServiceStub(c2), launchpool_pb2_grpc.LaunchpoolServiceStub(c3), chaos)
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


async def observe(w: World) -> tuple[dict[tuple[str, str, int], Decimal], dict[tuple[str, str], dict[int, Decimal]]]:
    balances: dict[tuple[str, str, int], Decimal] = {}
    for owner in (*USERS, "simple_earn", "launchpool"):
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
    return balances, records


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
    positions: dict[tuple[str, str], str] = {}
    # Chaos: every target once at a seeded command (some during catch-ups, while ticks and
    # payouts run), the scheduler CLI at a seeded catch-up, plus a few more kills.
    kill_at: dict[int, list[str]] = {}
    if w.chaos is not None:
        catch_ups = [c.index for c in commands if c.kind == "catch_up"][:-1]
        targets = [t for t in TARGETS if t != "scheduler"] + [w.chaos.choice(TARGETS) for _ in range(2)]
        for index, target in zip(w.chaos.sample([c.index for c in commands[:-1]], len(targets)), targets):
            kill_at.setdefault(index, []).append(target)
        kill_at.setdefault(w.chaos.choice(catch_ups), []).append("scheduler")
    killing: asyncio.Task[None] | None = None

    for c in commands:
        w.move(at(c.hour, c.minute))
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
            await w.catch_up()
    if killing is not None:
        await killing

    # Quiesce: everything up (the supervisor restarts what exited), one more complete
    # catch-up, then the invariants and the comparison until consistent.
    for proc in w.processes.values():
        if proc.spec.port_env:
            await asyncio.to_thread(proc.wait_ready, 90)
    await w.catch_up(final=True)
    outcome: Outcome | None = None

    async def consistent() -> None:
        nonlocal outcome
        await check_invariants(w)
        balances, records = await observe(w)
        # Settled: the same a moment later (a payout still in flight would change it; the
        # calm run has no reference to wait for, so it must not be read mid-payout).
        await asyncio.sleep(2)
        assert (balances, records) == await observe(w), "still moving"
        outcome = Outcome(sorted(w.accepted), sorted(w.refused), balances, records)
        if reference is not None:
            assert outcome.accepted == reference.accepted and outcome.refused == reference.refused, "accepted commands differ"
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
    async with world(infra, "calm") as w:
        outcome = await scenario(w, workload(SEED))
    assert not outcome.refused, f"seed {SEED}: the calm run refused {outcome.refused}"
    assert any(product == "pool" for _, product in outcome.records), "the workload paid no Launchpool reward"
    return outcome


@pytest.mark.timeout(900)
async def test_mixed_chaos_kills_services_broker_and_database_and_loses_nothing(infra: Infra, calm: Outcome) -> None:
    print(f"chaos seed {SEED}; replay: {REPLAY}")
    try:
        async with world(infra, "chaos", random.Random(SEED)) as w:
            got = await scenario(w, workload(SEED), reference=calm)
            print(f"mixed chaos seed {SEED}: killed {w.kills}; exited on their own and restarted: {w.restarts}; command retries: {w.retries}")
            assert set(TARGETS) <= set(w.kills), f"not every target was killed: {w.kills}"
    except BaseException:
        print(f"mixed chaos FAILED for seed {SEED}; replay: {REPLAY}")
        raise
    assert got == calm
