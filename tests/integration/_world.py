"""The world of an end-to-end test, set up and torn down the same way for every service:
its own database and topic prefix (on the shared servers), a file clock every process of
the world reads, the service processes (real processes through the conftest's
``stack.spawn``: SIGKILL-able), gRPC channels to them, and the scheduler's catch-up CLI
run against them.

``stage(stack, name, now)`` creates the database and the clock and, whatever happens,
stops every process it started and drops the database. A test's ``World`` subclasses
:class:`World` with its stubs; :meth:`Stage.world` gives the common fields."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from aiokafka import AIOKafkaProducer
from google.protobuf.timestamp_pb2 import Timestamp

from earn.v1 import market_pb2, market_pb2_grpc, wallet_pb2, wallet_pb2_grpc

from services.devstack.processes import PROCESSES, ManagedProcess, ProcessSpec
from services.kernel import grpcclient
from services.kernel.clock import set_time
from services.kernel.config import REPO_ROOT
from services.market import domain as market_domain
from services.market.simulator import tick_envelope
from tests.conftest import OPERATOR, SERVICE, eventually


FUNDING = wallet_pb2.ACCOUNT_KIND_FUNDING
ENGINE_SETTLE_SECONDS = 10.0


def spec(name: str) -> ProcessSpec:
    return next(s for s in PROCESSES if s.name == name)


@dataclass(kw_only=True)
class World:
    """What every world has: the clock file, the CLI's environment, the processes by name,
    the wallet, the scheduler job it catches up (all when empty), and under chaos the
    seeded random and the kill count."""

    clock: Path
    env: dict[str, str]
    processes: dict[str, ManagedProcess]
    wallet: wallet_pb2_grpc.WalletServiceStub
    job: str = ""  # "": every job
    chaos: random.Random | None = None
    kills: int = 0
    cli_timeout: int = 300

    def move(self, moment: datetime) -> None:
        set_time(self.clock, moment)
        time.sleep(0.02)  # a new modification time for every reader's cache

    async def restart(self, process: str, **env: str) -> None:
        """SIGKILL ``process`` and start it again with ``env`` (and without a crash setting
        given before), ready."""
        proc = self.processes[process]
        proc.kill()
        self.kills += 1
        proc.env.pop("EARN_CRASH_AFTER_CHUNKS", None)
        proc.env.update(env)
        proc.start()
        await asyncio.to_thread(proc.wait_ready, 60)

    def cli(self) -> list[str]:
        return [sys.executable, "-m", "services.scheduler.cli", "catch-up", *(["--job", self.job] if self.job else [])]

    async def run_cli(self) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, self.cli(), cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=self.cli_timeout,
        )

    async def balance(self, owner: str, asset: str = "USDT", kind: int = FUNDING) -> Decimal:
        reply = await self.wallet.GetBalances(wallet_pb2.GetBalancesRequest(owner=owner, asset=asset), metadata=OPERATOR)
        return sum((Decimal(b.balance) for b in reply.balances if b.kind == kind), Decimal(0))

    async def caught_up(self) -> None:
        done = await self.run_cli()
        assert done.returncode == 0, done.stdout + done.stderr

    async def kill_cli_at_random(self, low: float, high: float) -> None:
        """Chaos: the catch-up CLI SIGKILLed after a seeded pause (if it still runs)."""
        assert self.chaos is not None
        cli = subprocess.Popen(self.cli(), cwd=REPO_ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(self.chaos.uniform(low, high))
        if cli.poll() is None:
            cli.kill()
            self.kills += 1
        await asyncio.to_thread(cli.wait)

    async def kill_at_random(self, process: str, rng: random.Random, low: float, high: float) -> int:
        """Chaos: the catch-up CLI started; after a seeded pause, ``process``, the CLI or
        both SIGKILLed (``process`` started again, ready). How many were killed."""
        cli = subprocess.Popen(self.cli(), cwd=REPO_ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(rng.uniform(low, high))
        victim = rng.choice([process, "cli", "both"])
        kills = 0
        if victim in (process, "both"):
            proc = self.processes[process]
            proc.kill()
            proc.start()
            await asyncio.to_thread(proc.wait_ready, 60)
            kills += 1
        if victim in ("cli", "both") and cli.poll() is None:
            cli.kill()
            kills += 1
        await asyncio.to_thread(cli.wait)
        return kills

    async def crash_after_paid_chunks(self, process: str, chunks: int) -> None:
        """Chaos: ``process`` kills itself right after the wallet paid ``chunks`` chunks of a
        distribution, before recording them (EARN_CRASH_AFTER_CHUNKS); the catch-up fails;
        the process restarts, for the next run to pay the rest, once."""
        await self.restart(process, EARN_CRASH_AFTER_CHUNKS=str(chunks))
        failed = await self.run_cli()
        assert failed.returncode != 0, failed.stdout
        await asyncio.to_thread(self.processes[process].popen.wait, 30)  # type: ignore[union-attr]
        await self.restart(process)


@dataclass(kw_only=True)
class PricedWorld(World):
    """A world whose products settle on index prices: the wallet, the market service (fed
    by ``topic``, market.prices) and the service under test."""

    market: market_pb2_grpc.MarketServiceStub
    producer: AIOKafkaProducer
    topic: str

    async def publish(self, pair: str, ticks: list[tuple[datetime, Decimal]]) -> None:
        """Exchange ticks of ``pair``, waited for until the market's index has the last."""
        p = market_domain.parse_pair(pair)
        for moment, price in ticks:
            await self.producer.send(self.topic, tick_envelope(p, price, moment, "exchange", uuid.uuid4()), key=pair.encode())
        await self.producer.flush()
        last = max(t for t, _ in ticks)
        at = Timestamp()
        at.FromDatetime(last)

        async def arrived() -> None:
            try:
                reply = await self.market.GetIndex(market_pb2.GetIndexRequest(pair=pair, at=at), metadata=SERVICE)
            except grpc.aio.AioRpcError as err:
                raise AssertionError(err.details()) from None
            assert reply.event_time.ToDatetime(tzinfo=UTC) == last

        await eventually(arrived, timeout=30)

    async def catch_up(self, *, ok: bool = True) -> str:
        """The job's catch-up, expected to succeed (or, ``ok=False``, to fail): its output."""
        done = await self.run_cli()
        assert (done.returncode == 0) == ok, done.stdout + done.stderr
        return done.stdout + done.stderr


@dataclass(kw_only=True)
class EngineWorld(World):
    """A world with the accrual engine computing the service's payouts. Under chaos the
    catch-up CLI is SIGKILLed at random moments of runs, the engine now and then (only
    once it has run ``ENGINE_SETTLE_SECONDS``: restart storms while faust rejoins its
    group can stall it, an open issue in the README) and, with ``also_kill``, that
    process too, before a last run completes the catch-up."""

    engine_kill_chance: float
    also_kill: str = ""
    engine_started: float = field(default_factory=time.monotonic)
    cli_timeout: int = 600

    async def catch_up(self) -> None:
        while self.chaos is not None and (self.kills == 0 or self.chaos.random() < 0.7):
            cli = subprocess.Popen(self.cli(), cwd=REPO_ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(self.chaos.uniform(0.2, 2.5))
            if self.chaos.random() < self.engine_kill_chance and time.monotonic() - self.engine_started > ENGINE_SETTLE_SECONDS:
                engine = self.processes["accrual"]
                engine.kill()
                engine.start()
                self.engine_started = time.monotonic()
                self.kills += 1
            if self.also_kill and self.chaos.random() < 0.3:  # maybe between recording a batch and paying it
                service = self.processes[self.also_kill]
                service.kill()
                service.start()
                await asyncio.to_thread(service.wait_ready, 60)
                self.kills += 1
            if cli.poll() is None:
                cli.kill()
                self.kills += 1
            await asyncio.to_thread(cli.wait)
        engine = self.processes["accrual"]
        if self.chaos is not None and not engine.running():
            # The worker exits on purpose when it cannot go on (exit 70: a delivery or a
            # direct read timed out); the supervisor (`make run`, Kubernetes) restarts it.
            engine.start()
        await self.caught_up()


@dataclass
class Stage:
    """A world being set up: ``env`` is what every process of it gets (database, topic
    prefix, clock file)."""

    stack: Any  # tests.conftest.Env
    clock: Path
    env: dict[str, str]
    processes: dict[str, ManagedProcess]
    now: datetime

    @property
    def prefix(self) -> str:
        return self.env["EARN_TOPIC_PREFIX"]

    def address(self, process: str) -> str:
        return self.processes[process].address or ""

    async def start(self, process: str, **extra: str) -> ManagedProcess:
        proc = self.stack.spawn(spec(process), **self.env, **extra)
        proc.start()
        self.processes[process] = proc
        await asyncio.to_thread(proc.wait_ready, 60)
        return proc

    def world(self, job: str, chaos: random.Random | None = None, **cli_env: str) -> dict[str, Any]:
        """The :class:`World` fields: the CLI's environment starts its scheduler at the
        world's first moment."""
        env = {**self.stack.env, **self.env, **cli_env, "EARN_SCHEDULER_START": self.now.isoformat(), "EARN_METRICS_PORT": "0"}
        return dict(clock=self.clock, env=env, processes=self.processes, job=job, chaos=chaos)

    @asynccontextmanager
    async def channels(self, *processes: str) -> AsyncIterator[list[grpc.aio.Channel]]:
        async with AsyncExitStack() as channels:
            yield [await channels.enter_async_context(grpcclient.channel(self.address(p))) for p in processes]


@asynccontextmanager
async def stage(stack: Any, name: str, now: datetime) -> AsyncIterator[Stage]:
    """A world's database ``<test database>_<name>``, topic prefix ``<test prefix><name>.``
    and clock file at ``now``; on the way out every process stopped, the database dropped."""
    database = f"{stack.settings.pg_database}_{name}"
    admin = await asyncpg.connect(stack.settings.database_url.rsplit("/", 1)[0] + "/postgres")
    processes: dict[str, ManagedProcess] = {}
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
        clock = Path(tempfile.mkdtemp(prefix="clock-")) / "now"
        set_time(clock, now)
        env = {"EARN_PG_DATABASE": database, "EARN_TOPIC_PREFIX": f"{stack.settings.topic_prefix}{name}.", "EARN_CLOCK_FILE": str(clock)}
        yield Stage(stack, clock, env, processes, now)
    finally:
        for proc in reversed(processes.values()):
            proc.stop()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


@asynccontextmanager
async def priced(stack: Any, name: str, now: datetime, service: str, job: str, **service_env: str) -> AsyncIterator[tuple[dict[str, Any], grpc.aio.Channel]]:
    """A :class:`PricedWorld`'s processes: the wallet and the market (index gaps up to a
    minute), then ``service`` using both, and a producer of market.prices. Yields the
    world's fields and the channel to ``service``."""
    async with stage(stack, name, now) as s:
        await asyncio.gather(s.start("wallet"), s.start("market", EARN_MAX_GAP_SECONDS="60"))
        await s.start(service, EARN_WALLET_ADDRESS=s.address("wallet"), EARN_MARKET_ADDRESS=s.address("market"), **service_env)
        producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_idempotence=True)
        try:
            await producer.start()
            async with s.channels(service, "market", "wallet") as (own, market, wallet):
                fields = s.world(job, **{f"EARN_{service.upper()}_ADDRESS": s.address(service)})
                fields.update(
                    market=market_pb2_grpc.MarketServiceStub(market), wallet=wallet_pb2_grpc.WalletServiceStub(wallet), producer=producer,
                    topic=s.prefix + "market.prices",
                )
                yield fields, own
        finally:
            await producer.stop()


@asynccontextmanager
async def engine(
    stack: Any, name: str, now: datetime, service: str, job: str, chaos: random.Random | None = None, **service_env: str,
) -> AsyncIterator[tuple[dict[str, Any], grpc.aio.Channel]]:
    """An :class:`EngineWorld`'s processes: the wallet, ``service`` using it, the accrual
    engine. Yields the world's fields and the channel to ``service``."""
    async with stage(stack, name, now) as s:
        await s.start("wallet")
        await s.start(service, EARN_WALLET_ADDRESS=s.address("wallet"), **service_env)
        await s.start("accrual")
        async with s.channels(service, "wallet") as (own, wallet):
            fields = s.world(job, chaos, **{f"EARN_{service.upper()}_ADDRESS": s.address(service)})
            yield {**fields, "wallet": wallet_pb2_grpc.WalletServiceStub(wallet)}, own
