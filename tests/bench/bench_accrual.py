"""Accrual benchmark: the cost of closing an hour, and a daily payout over N positions
through the real pipeline next to one set-based SQL statement.

    .venv/bin/python -m tests.bench.bench_accrual                      # N = 1,000,000
    .venv/bin/python -m tests.bench.bench_accrual --positions 100000
    .venv/bin/python -m tests.bench.bench_accrual --positions 600000 --ticks 1000 --skip-pipeline   # 1a only, no servers

1. HourClosed with 1,000 and N open positions, two ways:
   a. in-process: ``services.accrual.app.Engine.in_memory``: plain dicts instead of faust tables
      (faust tables cannot be written outside a worker's stream), state built by feeding
      the same PositionChanged envelopes through ``Engine.handle``; time per
      ``Engine.handle(HourClosed)`` averaged over many ticks; then one partition's payout
      (``Engine.handle(PayoutRequested)``, emitting to an in-memory sink);
   b. end-to-end against a real engine process, at 1,000, 100,000 and N loaded positions:
      HourClosed produced to all 6 input partitions until the engine counted all 6 on
      /metrics, and the engine's own earn_accrual_tick_to_visible_seconds.
2. A daily payout over N positions with real processes (wallet, simple_earn, accrual
   engine; database ``earn_bench_accrual``, a topic prefix of its own, a file clock for
   Simple Earn). Positions are loaded as PositionChanged envelopes produced straight onto
   the engine's input topic; the matching rows go into Simple Earn's tables, and the
   funds they imply into the wallet (each user's principal on a HOLD account backed by
   a wallet hold, the exchange's EXTERNAL account the counterpart), all with COPY. Timed
   from RequestPayout until Simple Earn recorded the last batch of all 6 partitions
   (it marks a batch posted after the wallet committed its BulkCredit), then checked in
   the wallet: N credits from the expense account, same total, ledger sums zero. Then,
   once the wallet folded the credits in the background, the straightforward SQL way on a
   copy of the same data, one statement, and where the pipeline's time went. Day after
   day (``--days``, default 3), each day's payout next to its SQL statement, both on
   settled tables after a checkpoint: the verdict is the median of the days' ratios, so
   that a slow moment of a shared machine weighs on one day's pair, not on the verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import statistics
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import asyncpg
from services.kernel import grpcclient
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from earn.v1 import accrual_pb2, simple_earn_pb2 as se, simple_earn_pb2_grpc, wallet_pb2, wallet_pb2_grpc
from services.accrual.app import Engine
from services.devstack.processes import ManagedProcess
from services.kernel import events
from services.kernel.clock import hour_start, set_time, unix_hour
from services.kernel.config import Settings
from services.kernel.money import format_amount
from services.kernel.topics import topic_name
from tests.bench._common import (
    CLK_TCK,
    CpuMeter,
    drop_database,
    header,
    metric_sum,
    recreate_database,
    schema_tables,
    scrape,
    settle,
    spawn,
    ticks,
)
from tests.conftest import OPERATOR, SERVICE, delete_topics_and_groups

DATABASE = "earn_bench_accrual"
PARTITIONS = 6
PRODUCT = "bench-usdt"
ASSET = "USDT"
SCALE = 6
# Income-tax-like brackets: 0-500 at 8%, 500-5,000 at 5%, above at 2%.
TIERS = (("500", "0.08"), ("5000", "0.05"), ("", "0.02"))
JOB = "simple_earn.interest"
INPUT = "simple_earn.accrual"
OUTPUT = "accrual.payouts"
EXPENSE_OWNER = "simple_earn"


def user(i: int) -> str:
    return f"u{i}"


def now() -> float:
    return time.perf_counter()


def say(text: str = "") -> None:
    print(text, flush=True)


def fmt_s(seconds: float) -> str:
    return f"{seconds:,.2f} s"


# ------------------------------------------------------------------ the positions


@dataclass
class Book:
    """N positions: principal, input partition and PositionChanged envelope of each
    (position i+1 at index i). One product, one asset, accruing from hour h0."""

    h0: int
    principals: list[Decimal]
    partitions: list[int]
    envelopes: list[bytes]

    @property
    def size(self) -> int:
        return len(self.principals)


def make_book(n: int, h0: int, seed: int = 20260101) -> Book:
    rnd = random.Random(seed)
    at = datetime.now(UTC)
    principals: list[Decimal] = []
    partitions: list[int] = []
    envelopes: list[bytes] = []
    for i in range(1, n + 1):
        # log-uniform 10 .. ~50,000 USDT: every bracket gets used.
        principal = Decimal(int(10 ** rnd.uniform(7.0, 10.7))).scaleb(-SCALE)
        pid = str(i)
        msg = accrual_pb2.PositionChanged(
            position_id=pid, product_id=PRODUCT, user_id=user(i), asset=ASSET,
            changes=[accrual_pb2.PrincipalChange(effective_hour=h0, delta=format_amount(principal))],
        )
        principals.append(principal)
        partitions.append(zlib.crc32(pid.encode()) % PARTITIONS)
        envelopes.append(events.wrap(msg, key=pid, producer="simple_earn", occurred_at=at).SerializeToString())
    return Book(h0, principals, partitions, envelopes)


def envelope(msg, key: str) -> bytes:  # type: ignore[no-untyped-def]
    return events.wrap(msg, key=key, producer="bench", occurred_at=datetime.now(UTC)).SerializeToString()


def rate_tiers() -> list[accrual_pb2.RateTier]:
    return [accrual_pb2.RateTier(up_to=u, apr=a) for u, a in TIERS]


# ------------------------------------------------------------------ 1a: in-process


class _Sink:
    """The engine's output topic, in-process: counts batches, delivered at once."""

    def __init__(self) -> None:
        self.batches = 0

    async def send(self, *, key: bytes, value: bytes, partition: int, force: bool):  # type: ignore[no-untyped-def]
        self.batches += 1
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


def _event(partition: int, offset: int, raw: bytes) -> SimpleNamespace:
    return SimpleNamespace(value=raw, message=SimpleNamespace(partition=partition, offset=offset, tp=None))


async def in_process(book: Book, sizes: list[int], tick_count: int) -> None:
    say(f"\n1a. HourClosed in-process: Engine.in_memory (dicts for tables) (no faust, no Kafka), {tick_count:,} ticks per size")
    engine = Engine.in_memory(_Sink(), PARTITIONS)
    offsets = [0] * PARTITIONS

    async def feed(partition: int, raw: bytes) -> None:
        await engine.handle(_event(partition, offsets[partition], raw))  # type: ignore[arg-type]
        offsets[partition] += 1

    for p in range(PARTITIONS):
        await feed(p, envelope(accrual_pb2.ProductRatesSet(product_id=PRODUCT, asset=ASSET, effective_hour=book.h0, tiers=rate_tiers()), f"product:{PRODUCT}"))
    loaded, hour = 0, book.h0
    means: dict[int, float] = {}
    for size in sizes:
        t = now()
        for i in range(loaded, size):
            await feed(book.partitions[i], book.envelopes[i])
        built = now() - t
        loaded = size
        assert len(engine.positions) == size
        raws = [(j % PARTITIONS, envelope(accrual_pb2.HourClosed(hour=hour + 1 + j // PARTITIONS), "tick")) for j in range(tick_count)]
        hour += tick_count // PARTITIONS + 1
        samples = []
        for p, raw in raws:
            t = time.perf_counter_ns()
            await feed(p, raw)
            samples.append(time.perf_counter_ns() - t)
        samples.sort()
        means[size] = statistics.fmean(samples) / 1000
        if size == sizes[-1] and size > 1_000:
            IN_PROCESS["position_us"] = built / (size - (sizes[0] if len(sizes) > 1 else 0)) * 1e6
        previous = 0 if size == sizes[0] else sizes[sizes.index(size) - 1]
        say(
            f"  {size:>9,} positions: HourClosed {means[size]:6.2f} µs mean, p50 {samples[len(samples) // 2] / 1000:6.2f} µs,"
            f" p99 {samples[int(len(samples) * 0.99)] / 1000:6.2f} µs, max {samples[-1] / 1000:8.1f} µs"
            f"   (state: {size - previous:,} more positions through Engine.handle(PositionChanged) in {built:,.2f} s"
            f" = {built / max(1, size - previous) * 1e6:.1f} µs each)"
        )
    if len(sizes) > 1:
        say(f"  ratio {sizes[-1]:,} / {sizes[0]:,} positions: {means[sizes[-1]] / means[sizes[0]]:.2f}x (1.0 = does not grow)")
    SUMMARY.append("HourClosed in-process (Engine.handle): " + ", ".join(f"{means[z]:.1f} µs at {z:,} positions" for z in sizes))
    # The payout's pure compute for one partition, for the breakdown of part 2.
    count = sum(1 for p in book.partitions if p == 0)
    raw = envelope(accrual_pb2.PayoutRequested(job=JOB, period="in-process", boundary_hour=book.h0 + 24, product_ids=[PRODUCT]), "payout")
    t = now()
    await feed(0, raw)
    spent = now() - t
    say(
        f"  reference for part 2: Engine.handle(PayoutRequested) on partition 0 ({count:,} positions, no faust/Kafka):"
        f" {spent:,.2f} s = {spent / max(1, count) * 1e6:,.1f} µs per position"
    )
    IN_PROCESS["payout_us_per_position"] = spent / max(1, count) * 1e6


IN_PROCESS: dict[str, float] = {}
SUMMARY: list[str] = []


# ------------------------------------------------------------------ 2: the stack


@dataclass
class Stack:
    settings: Settings
    prefix: str
    clock: Path
    wallet: ManagedProcess
    earn: ManagedProcess
    engine: ManagedProcess
    workdir: Path

    @property
    def input_topic(self) -> str:
        return topic_name(self.settings, INPUT)

    @property
    def output_topic(self) -> str:
        return topic_name(self.settings, OUTPUT)

    def engine_metrics(self) -> dict[str, float]:
        if not self.engine.running():
            raise RuntimeError(f"the accrual engine exited; see {self.engine.logfile}")
        assert self.engine.metrics_url
        return scrape(self.engine.metrics_url)

    def engine_count(self, kind: str) -> float:
        return metric_sum(self.engine_metrics(), "earn_accrual_events_total", type=kind)


async def wait_for(check, timeout: float, what: str, every: float = 0.25) -> float:  # type: ignore[no-untyped-def]
    start = now()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return now() - start
        if now() - start > timeout:
            raise TimeoutError(f"{what}: not done after {timeout:.0f} s")
        await asyncio.sleep(every)


async def seed(pool: asyncpg.Pool, book: Book) -> str:
    """Simple Earn's rows for the positions and the wallet's funds behind them, by COPY,
    settled (``settle``: its line is returned)."""
    h0 = book.h0
    at = hour_start(h0 - 1) + timedelta(minutes=40)
    n = book.size
    total = sum(book.principals, Decimal(0))

    async def simple_earn() -> None:
        async with pool.acquire() as conn:
            await conn.copy_records_to_table(
                "positions", schema_name="simple_earn",
                columns=["id", "user_id", "product_id", "asset", "kind", "principal", "status", "auto_subscribe", "auto_renew",
                         "accrues_from_hour", "opened_at", "updated_at"],
                records=((i, user(i), PRODUCT, ASSET, "flexible", p, "active", False, False, h0, at, at)
                         for i, p in enumerate(book.principals, 1)),
            )
            await conn.copy_records_to_table(
                "principal_changes", schema_name="simple_earn", columns=["position_id", "effective_hour", "delta", "created_at"],
                records=((i, h0, p, at) for i, p in enumerate(book.principals, 1)),
            )
            await conn.copy_records_to_table(
                "position_holds", schema_name="simple_earn", columns=["hold_id", "position_id", "amount", "remaining", "created_at"],
                records=((i, i, p, p, at) for i, p in enumerate(book.principals, 1)),
            )
            await conn.execute("SELECT setval('simple_earn.positions_id_seq', $1)", n)
            await conn.execute("UPDATE simple_earn.products SET subscribed = $1 WHERE product_id = $2", total, PRODUCT)

    async def wallet() -> None:
        async with pool.acquire() as conn:
            def accounts():  # type: ignore[no-untyped-def]
                yield ("exchange", ASSET, "external", -total, True)
                for i, p in enumerate(book.principals, 1):
                    yield (user(i), ASSET, "funding", Decimal(0), False)
                    yield (user(i), ASSET, "hold", p, False)

            await conn.copy_records_to_table(
                "accounts", schema_name="wallet", columns=["owner", "asset", "kind", "balance", "may_go_negative"], records=accounts()
            )
            await conn.copy_records_to_table(
                "holds", schema_name="wallet",
                columns=["id", "owner", "asset", "holder", "amount", "remaining", "reference", "created_at", "updated_at"],
                records=((i, user(i), ASSET, EXPENSE_OWNER, p, p, f"simple_earn:subscribe:{PRODUCT}", at, at)
                         for i, p in enumerate(book.principals, 1)),
            )
            await conn.execute("SELECT setval('wallet.holds_id_seq', $1)", n)

    await asyncio.gather(simple_earn(), wallet())
    # Settled once both loads are committed (a load still open would keep the other's rows
    # from being marked visible to all), as autovacuum leaves tables loaded long before a
    # payout: Simple Earn checks each paid item with an index-only scan of
    # positions_identity, and no autovacuum of a table just loaded runs during the payout
    # (one did once: 0.7 CPU-s of the 14 the payout had).
    async with pool.acquire() as conn:
        return await settle(conn, ("simple_earn.positions", "simple_earn.principal_changes", "simple_earn.position_holds",
                                   "wallet.accounts", "wallet.holds"))


BASELINE_SETUP = """
DROP SCHEMA IF EXISTS sql_baseline CASCADE;
CREATE SCHEMA sql_baseline;
CREATE TABLE sql_baseline.asset_scales (asset text PRIMARY KEY, scale integer NOT NULL);
CREATE TABLE sql_baseline.tiers (product_id text NOT NULL, lower_bound numeric NOT NULL, up_to numeric, apr numeric NOT NULL);
CREATE TABLE sql_baseline.positions AS
    SELECT id, user_id, product_id, asset, kind, principal, status, 0::numeric AS carry_units, 0::numeric AS interest_paid FROM simple_earn.positions;
ALTER TABLE sql_baseline.positions ADD PRIMARY KEY (id);
CREATE TABLE sql_baseline.accounts WITH (fillfactor = 70) AS SELECT id, owner, asset, kind, balance FROM wallet.accounts;
ALTER TABLE sql_baseline.accounts ADD PRIMARY KEY (id), ADD UNIQUE (owner, asset, kind);
INSERT INTO sql_baseline.accounts (id, owner, asset, kind, balance)
    SELECT max(id) + 1, 'simple_earn', 'USDT', 'expense', 0 FROM sql_baseline.accounts;
CREATE TABLE sql_baseline.interest (
    id           bigserial      PRIMARY KEY,
    job          text           NOT NULL,
    period       text           NOT NULL,
    position_id  bigint         NOT NULL REFERENCES sql_baseline.positions (id),
    user_id      text           NOT NULL,
    product_id   text           NOT NULL,
    asset        text           NOT NULL,
    amount       numeric(38,18) NOT NULL CHECK (amount >= 0),
    carry        numeric(38,18) NOT NULL DEFAULT 0,
    from_hour    bigint         NOT NULL,
    to_hour      bigint         NOT NULL,
    reinvested   boolean        NOT NULL DEFAULT false,
    created_at   timestamptz    NOT NULL,
    UNIQUE (job, period, position_id)
);
CREATE INDEX ON sql_baseline.interest (user_id, id);
CREATE INDEX ON sql_baseline.interest (position_id, id);
"""

# ONE statement: each position's interest over the day (tiered brackets x 24 hours, plus
# the carried remainder, in units = amount x 8760 so nothing is rounded), truncated to
# the asset's scale; the payout rows inserted, the carries and interest_paid updated, the
# users' funding balances credited and the expense account debited.
BASELINE_PAYOUT = """
WITH due AS (
    SELECT p.id, p.user_id, p.product_id, p.asset, s.scale,
           p.carry_units + $3::numeric * sum(greatest(least(p.principal, coalesce(t.up_to, p.principal)) - t.lower_bound, 0) * t.apr) AS units
    FROM sql_baseline.positions p
    JOIN sql_baseline.tiers t ON t.product_id = p.product_id
    JOIN sql_baseline.asset_scales s ON s.asset = p.asset
    WHERE p.status = 'active' AND p.kind = 'flexible'
    GROUP BY p.id, s.scale
), paid AS (
    SELECT id, user_id, product_id, asset, units,
           div(units * power(10::numeric, scale), 8760) / power(10::numeric, scale) AS amount
    FROM due
), ins AS (
    INSERT INTO sql_baseline.interest (job, period, position_id, user_id, product_id, asset, amount, carry, from_hour, to_hour, created_at)
    SELECT $1, $2, id, user_id, product_id, asset, amount, trunc((units - amount * 8760) / 8760, 18), $4, $5, now() FROM paid
), pos AS (
    UPDATE sql_baseline.positions p
    SET carry_units = paid.units - paid.amount * 8760, interest_paid = p.interest_paid + paid.amount
    FROM paid WHERE p.id = paid.id
), credit AS (
    UPDATE sql_baseline.accounts a SET balance = a.balance + paid.amount
    FROM paid WHERE a.owner = paid.user_id AND a.asset = paid.asset AND a.kind = 'funding' AND paid.amount > 0
)
UPDATE sql_baseline.accounts a SET balance = a.balance - s.total
FROM (SELECT asset, sum(amount) AS total FROM paid GROUP BY asset) s
WHERE a.owner = 'simple_earn' AND a.kind = 'expense' AND a.asset = s.asset
"""


async def baseline_setup(conn: asyncpg.Connection) -> str:
    await conn.execute(BASELINE_SETUP)
    await conn.execute("INSERT INTO sql_baseline.asset_scales VALUES ($1, $2)", ASSET, SCALE)
    lower = Decimal(0)
    for up_to, apr in TIERS:
        await conn.execute(
            "INSERT INTO sql_baseline.tiers VALUES ($1, $2, $3, $4)", PRODUCT, lower, Decimal(up_to) if up_to else None, Decimal(apr)
        )
        lower = Decimal(up_to) if up_to else lower
    # Settled like the pipeline's tables (see seed), as long before a payout.
    return await settle(conn, [f"sql_baseline.{table}" for table in ("positions", "accounts", "tiers", "asset_scales")])


# ------------------------------------------------------------------ 1b: ticks end-to-end


async def load_positions(stack: Stack, producer: AIOKafkaProducer, book: Book, start: int, stop: int) -> tuple[float, float]:
    """Produce positions [start, stop) and wait until the engine applied them all.
    Returns (seconds to produce, seconds until applied), both from the first send."""
    t = now()
    pending = []
    for i in range(start, stop):
        pending.append(await producer.send(stack.input_topic, book.envelopes[i], key=str(i + 1).encode(), partition=book.partitions[i]))
        if len(pending) >= 20_000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    produced = now() - t
    await wait_for(lambda: stack.engine_count("PositionChanged") >= stop, timeout=900, what=f"engine applying {stop:,} positions")
    return produced, now() - t


async def tick(stack: Stack, producer: AIOKafkaProducer, hour: int) -> tuple[float, float, float]:
    """HourClosed(hour) to all 6 partitions. Returns (produce -> all 6 processed, seen by
    the bench polling /metrics every 5 ms; the engine's own mean occurred_at -> processed
    over the 6 copies; the produce call alone)."""
    before = await asyncio.to_thread(stack.engine_metrics)
    c0 = metric_sum(before, "earn_accrual_events_total", type="HourClosed")
    s0 = before.get("earn_accrual_tick_to_visible_seconds_sum", 0.0)
    t = now()
    at = datetime.now(UTC)
    futures = [
        await producer.send(
            stack.input_topic,
            events.wrap(accrual_pb2.HourClosed(hour=hour), key=f"hour:{hour}", producer="simple_earn", occurred_at=at).SerializeToString(),
            key=f"hour:{hour}".encode(), partition=p,
        )
        for p in range(PARTITIONS)
    ]
    await asyncio.gather(*futures)
    produced = now() - t
    while True:
        sample = await asyncio.to_thread(stack.engine_metrics)
        if metric_sum(sample, "earn_accrual_events_total", type="HourClosed") >= c0 + PARTITIONS:
            break
        if now() - t > 60:
            raise TimeoutError(f"HourClosed {hour} not processed after 60 s")
        await asyncio.sleep(0.005)
    seen = now() - t
    engine_mean = (sample.get("earn_accrual_tick_to_visible_seconds_sum", 0.0) - s0) / PARTITIONS
    return seen, engine_mean, produced


# ------------------------------------------------------------------ 2: watching the payout


@dataclass
class SeenBatch:
    partition: int
    sequence: int
    last: bool
    items: int
    produced: float  # Kafka record timestamp (the engine's producer), epoch seconds


@dataclass
class Watch:
    """The engine's PayoutBatches (and the PayoutRequested copies), read with no consumer
    group once the payout is complete: when each batch was produced. Read afterwards, not
    during the payout, so that the benchmark's own consumer (fetching and parsing every
    batch) takes no CPU from the pipeline it measures."""

    stack: Stack
    batches: list[SeenBatch] = field(default_factory=list)
    requested: list[float] = field(default_factory=list)
    _inputs_from: dict[TopicPartition, int] = field(default_factory=dict)
    _outputs_from: dict[TopicPartition, int] = field(default_factory=dict)

    def _consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.stack.settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
            max_partition_fetch_bytes=16 << 20, fetch_max_bytes=64 << 20,
        )

    async def start(self) -> None:
        """Note where the partitions end (the payout request and its batches come after)."""
        consumer = self._consumer()
        await consumer.start()
        try:
            ins = [TopicPartition(self.stack.input_topic, p) for p in range(PARTITIONS)]
            outs = [TopicPartition(self.stack.output_topic, p) for p in range(PARTITIONS)]
            self._inputs_from = await consumer.end_offsets(ins)
            self._outputs_from = await consumer.end_offsets(outs)
        finally:
            await consumer.stop()

    async def collect(self) -> None:
        """Read the output's batches and the input's records since ``start``."""
        consumer = self._consumer()
        await consumer.start()
        try:
            since = {**self._inputs_from, **self._outputs_from}
            ends = await consumer.end_offsets(list(since))
            consumer.assign(list(since))
            for tp, offset in since.items():
                consumer.seek(tp, offset)
            while True:
                behind = [tp for tp, end in ends.items() if await consumer.position(tp) < end]
                if not behind:
                    break
                got = await consumer.getmany(timeout_ms=200)
                for tp, records in got.items():
                    for r in records:
                        env = events.parse(r.value)
                        if tp.topic == self.stack.input_topic:
                            if env.type == accrual_pb2.PayoutRequested.DESCRIPTOR.full_name:
                                self.requested.append(r.timestamp / 1000)
                            continue
                        b = events.unwrap(env, accrual_pb2.PayoutBatch)
                        self.batches.append(SeenBatch(b.partition, b.sequence, b.last, len(b.position_ids), r.timestamp / 1000))
        finally:
            await consumer.stop()

    def lasts(self) -> int:
        return sum(1 for b in self.batches if b.last)


def simple_earn_batches(logfile: Path, since: float) -> list[tuple[float, int, int, str]]:
    """(time applied, partition, offset, outcome) of Simple Earn's 'payout batch' log lines."""
    out = []
    for line in logfile.read_text(errors="replace").splitlines():
        if '"payout batch"' not in line:
            continue
        try:
            rec = json.loads(line)
            at = datetime.strptime(rec["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, like the log
        except (ValueError, KeyError):
            continue
        if at >= since - 1:
            out.append((at, int(rec.get("partition", -1)), int(rec.get("offset", -1)), str(rec.get("outcome"))))
    return sorted(out)


# ------------------------------------------------------------------ part 2


async def pipeline(book: Book, e2e_ticks: int, days: int) -> None:
    base = Settings()
    run = uuid.uuid4().hex[:6]
    prefix = f"bench_accrual_{run}."
    settings = Settings(pg_database=DATABASE, topic_prefix=prefix)
    workdir = base.data_dir / "bench-accrual"
    log_dir = base.data_dir / "bench-logs" / "accrual"
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(log_dir, ignore_errors=True)
    workdir.mkdir(parents=True)
    clock = workdir / "clock"
    h0 = book.h0
    set_time(clock, hour_start(h0 - 1) + timedelta(minutes=30))
    n = book.size

    say(f"\n2. Daily payout over {n:,} positions through the pipeline; database {DATABASE}, topic prefix {prefix}")
    await recreate_database(base, DATABASE)
    env = {**os.environ, "EARN_PG_DATABASE": DATABASE, "EARN_TOPIC_PREFIX": prefix, "EARN_CLOCK_FILE": str(clock)}
    wallet = spawn("wallet", {**env, "EARN_LOG_LEVEL": "WARNING"}, log_dir)
    wallet.start()
    engine = spawn("accrual", {**env, "EARN_LOG_LEVEL": "INFO", "EARN_DATA_DIR": str(workdir)}, log_dir)  # faust's data dir goes there
    engine.start()
    earn: ManagedProcess | None = None
    stack: Stack | None = None
    pool: asyncpg.Pool | None = None
    try:
        wallet.wait_ready(60)
        earn = spawn("simple_earn", {**env, "EARN_LOG_LEVEL": "INFO", "EARN_WALLET_ADDRESS": wallet.address or ""}, log_dir)
        earn.start()
        earn.wait_ready(60)
        stack = Stack(settings, prefix, clock, wallet, earn, engine, workdir)
        say(f"   processes: wallet pid {wallet.pid}, simple_earn pid {earn.pid}, accrual engine pid {engine.pid}; logs in {log_dir}")
        pool = await asyncpg.create_pool(settings.database_url, min_size=2, max_size=3, server_settings={"application_name": "bench"})
        assert pool is not None
        await run_pipeline(stack, pool, book, e2e_ticks, days)
    finally:
        for proc in (engine, earn, wallet):
            if proc is not None:
                proc.stop()
        if pool is not None:
            await pool.close()
        await drop_database(base, DATABASE)
        await asyncio.to_thread(delete_topics_and_groups, base, prefix)
        shutil.rmtree(workdir, ignore_errors=True)


async def run_pipeline(stack: Stack, pool: asyncpg.Pool, book: Book, e2e_ticks: int, days: int) -> None:
    n, h0 = book.size, book.h0
    channel = grpcclient.channel(stack.earn.address or "")
    wchannel = grpcclient.channel(stack.wallet.address or "")
    earn = simple_earn_pb2_grpc.SimpleEarnServiceStub(channel)
    wallet = wallet_pb2_grpc.WalletServiceStub(wchannel)
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.settings.kafka_bootstrap, acks="all", linger_ms=20, max_batch_size=1 << 20, max_request_size=8 << 20,
        enable_idempotence=True,
    )
    ticker = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, acks="all", linger_ms=0)
    await producer.start()
    await ticker.start()
    try:
        await earn.CreateProduct(
            se.CreateProductRequest(
                idempotency_key=f"bench-{stack.prefix}", product_id=PRODUCT, asset=ASSET, kind=se.PRODUCT_KIND_FLEXIBLE,
                tiers=rate_tiers(), min_subscription="1", payout_cadence=se.PAYOUT_CADENCE_DAILY,
            ),
            metadata=OPERATOR,
        )
        t = now()
        settled = await seed(pool, book)
        say(f"   seeded by COPY: {n:,} positions (+ principal changes, position holds) in simple_earn and"
            f" {2 * n + 1:,} accounts + {n:,} holds in the wallet (principal on HOLD, the exchange's EXTERNAL the counterpart): {fmt_s(now() - t)}")
        say(f"     {settled}")
        t = now()
        async with pool.acquire() as conn:
            settled = await baseline_setup(conn)
        say(f"   copy of the same data for the SQL baseline (schema sql_baseline): {fmt_s(now() - t)}")
        say(f"     {settled}")
        waited = await wait_for(lambda: stack.engine_count("ProductRatesSet") >= PARTITIONS, timeout=180, what="engine receiving the product rates")
        say(f"   engine consuming (product rates arrived through Simple Earn's outbox relay; waited {fmt_s(waited)} more)")

        # ---- 1b: loading stages and ticks
        say(f"\n1b. HourClosed end-to-end against the engine process: {e2e_ticks} ticks per size, each produced to all 6 partitions,"
            " measured after a 2.5 s pause and 2 warm-up ticks")
        stages = sorted({s for s in (1_000, 100_000, n) if s <= n})
        loaded, hour = 0, h0 + 1
        cpu = CpuMeter({"accrual engine process": stack.engine.pid or 0}, pool, DATABASE)
        await cpu.begin()
        load_started = now()
        applied_times: list[float] = []
        e2e: list[str] = []
        tick_rows = []
        for stage in stages:
            produced, applied = await load_positions(stack, producer, book, loaded, stage)
            if stage > 1_000:
                applied_times.append(applied)
            say(f"   loaded positions {loaded + 1:,}..{stage:,} ({stage - loaded:,}): produced in {fmt_s(produced)},"
                f" applied by the engine in {fmt_s(applied)} = {(stage - loaded) / applied:,.0f} positions/s")
            loaded = stage
            await asyncio.sleep(2.5)  # past the engine's commit interval (2 s): its changelog flush after the load
            for _ in range(2):  # warm-up, not measured
                await tick(stack, ticker, hour)
                hour += 1
            seen, mine, prod = [], [], []
            for _ in range(e2e_ticks):
                s, m, p = await tick(stack, ticker, hour)
                hour += 1
                seen.append(s), mine.append(m), prod.append(p)
                await asyncio.sleep(0.05)
            tick_rows.append((stage, seen, mine, prod))
            e2e.append(f"{statistics.median(seen) * 1000:.1f} ms at {stage:,}")
            say(f"   {stage:>9,} positions: produce -> all 6 processed: mean {statistics.fmean(seen) * 1000:5.1f} ms,"
                f" median {statistics.median(seen) * 1000:5.1f} ms (min {min(seen) * 1000:.1f}, max {max(seen) * 1000:.1f});"
                f" engine's tick_to_visible: mean {statistics.fmean(mine) * 1000:5.1f} ms, median {statistics.median(mine) * 1000:5.1f} ms;"
                f" the produce call alone {statistics.median(prod) * 1000:.1f} ms")
        load_total = now() - load_started
        SUMMARY.append("HourClosed end-to-end, produce -> processed in all 6 partitions (median): " + ", ".join(e2e))
        SUMMARY.append(f"loading positions into the engine through Kafka: {sum(applied_times) and (n - min(n, 1_000)) / sum(applied_times):,.0f} per second")
        if load_total > 180:
            say(f"   note: loading {n:,} positions through Kafka took {load_total / 60:.1f} min, more than the ~3 min meant for this part;"
                " part 2 needs every position in the engine, so they were all loaded and measured")
        rate = (n - min(n, 1_000)) / max(1e-9, sum(a for a in applied_times))
        if n < 1_000_000:
            say(f"   at the engine's loading rate ({rate:,.0f} positions/s) 1,000,000 positions would take ~{1_000_000 / rate:,.0f} s")
        load_cpu = await cpu.end()
        engine_cpu = load_cpu.get("accrual engine process", 0.0)
        say(f"   loading {n:,} positions took {fmt_s(load_total)} in all, ticks included; CPU: "
            + ", ".join(f"{k} {v:,.1f} s" for k, v in sorted(load_cpu.items(), key=lambda kv: -kv[1]) if v >= 0.5)
            + f"; engine CPU per PositionChanged {engine_cpu / n * 1e6:,.0f} µs"
            + (f" (Engine.handle alone, in-process: {IN_PROCESS['position_us']:.1f} µs)" if "position_us" in IN_PROCESS else ""))
        if len(tick_rows) > 1:
            first, last = tick_rows[0], tick_rows[-1]
            say(f"   ratio {last[0]:,} / {first[0]:,} positions (medians): {statistics.median(last[1]) / statistics.median(first[1]):.2f}x"
                f" (produce -> processed), {statistics.median(last[2]) / max(1e-9, statistics.median(first[2])):.2f}x (engine's histogram);"
                " 1.0 = does not grow")
        # ---- 2: the daily payout, day after day; each next to the SQL statement
        results: list[Day] = []
        for day in range(1, days + 1):
            boundary = h0 + 24 * day
            while hour <= boundary:  # the day's hours must be closed before its payout
                await tick(stack, ticker, hour)
                hour += 1
            results.append(await payout(stack, pool, earn, wallet, book, day, boundary))
        report(book, results)
    finally:
        await producer.stop()
        await ticker.stop()
        await channel.close()
        await wchannel.close()


@dataclass
class Day:
    day: int
    pipeline: float
    sql: float

    @property
    def ratio(self) -> float:
        return self.sql / self.pipeline


async def quiet_database(pool: asyncpg.Pool) -> str:
    """Before each timed run, pipeline or SQL: every table of both sides settled (as
    autovacuum leaves them long before a daily payout; the runs before left dead rows),
    then a checkpoint, so that neither run pays for the one before it."""
    async with pool.acquire() as conn:
        line = await settle(conn, await schema_tables(conn, ("simple_earn", "wallet", "sql_baseline")))
        await conn.execute("CHECKPOINT")
    return line


async def expense_credits(pool: asyncpg.Pool) -> tuple[int, Decimal, int]:
    """(credits, their total, BulkCredit postings) from the expense account so far."""
    async with pool.acquire() as conn:
        return await conn.fetchrow(
            "SELECT coalesce(sum(credit_count), 0), coalesce(sum(total), 0), count(*) FROM wallet.bulk_credits b"
            " JOIN wallet.accounts a ON a.id = b.source_id WHERE a.owner = $1 AND a.asset = $2 AND a.kind = 'expense'",
            EXPENSE_OWNER, ASSET,
        )


async def payout(
    stack: Stack, pool: asyncpg.Pool, earn: simple_earn_pb2_grpc.SimpleEarnServiceStub,
    wallet: wallet_pb2_grpc.WalletServiceStub, book: Book, day: int, boundary: int,
) -> Day:
    n = book.size
    period = f"bench-{stack.prefix.rstrip('.')}-day{day}"
    set_time(stack.clock, hour_start(boundary) + timedelta(minutes=30))
    say(f"\n2.{day} Payout of day {day}: RequestPayout(job={JOB}, period={period}, boundary_hour=h0+{24 * day}, daily) over {n:,} positions")
    t = now()
    settled = await quiet_database(pool)
    say(f"   before it ({fmt_s(now() - t)}): {settled}; CHECKPOINT")
    watch = Watch(stack)
    await watch.start()
    cpu = CpuMeter(
        {"accrual engine process": stack.engine.pid or 0, "Simple Earn process": stack.earn.pid or 0, "wallet process": stack.wallet.pid or 0},
        pool, DATABASE,
    )
    assert stack.wallet.metrics_url
    w0 = scrape(stack.wallet.metrics_url)
    credits0, credited0, postings0 = await expense_credits(pool)
    # (t, items Simple Earn recorded, engine CPU seconds so far): polled from the database
    # and /proc, which take nothing from the engine (its /metrics only for the progress lines)
    timeline: list[tuple[float, int, float]] = []
    engine_pid = stack.engine.pid or 0
    engine_cpu0 = (ticks(engine_pid) or 0) / CLK_TCK
    await cpu.begin()
    wall0 = time.time()
    t0 = now()
    reply = await earn.RequestPayout(
        se.RequestPayoutRequest(job=JOB, period=period, boundary_hour=boundary, cadence=se.PAYOUT_CADENCE_DAILY), metadata=SERVICE
    )
    t_requested = now() - t0
    assert list(reply.product_ids) == [PRODUCT], reply
    progress_every = 10.0
    next_progress = progress_every
    while True:
        async with pool.acquire() as conn:
            done, items = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM simple_earn.payout_partitions WHERE job = $1 AND period = $2),"
                " (SELECT coalesce(sum(items), 0) FROM simple_earn.payout_batches WHERE job = $1 AND period = $2)", JOB, period,
            )
        elapsed = now() - t0
        timeline.append((elapsed, items, (ticks(engine_pid) or 0) / CLK_TCK - engine_cpu0))
        if done >= PARTITIONS:
            break
        if elapsed >= next_progress:
            m = await asyncio.to_thread(stack.engine_metrics)
            say(f"   ... {elapsed:6.1f} s: engine emitted {int(metric_sum(m, 'earn_accrual_payout_items_total')):,} items so far"
                f" ({int(metric_sum(m, 'earn_accrual_payout_requests_total'))} partition requests so far), Simple Earn paid {items:,}")
            next_progress += progress_every
        if elapsed > 1800:
            raise TimeoutError("payout not complete after 30 minutes")
        await asyncio.sleep(0.2)
    total = now() - t0
    wall_end = wall0 + total
    usage = await cpu.end()
    w1 = scrape(stack.wallet.metrics_url)
    await asyncio.wait_for(watch.collect(), 120)
    assert watch.lasts() == PARTITIONS, "every partition's last batch read back"

    # ---- checks: Simple Earn says complete; the wallet holds every credit; ledger zero-sum
    status = await earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=JOB, period=period), metadata=SERVICE)
    paid = Decimal(status.paid[ASSET])
    credits1, credited1, postings1 = await expense_credits(pool)
    credits, credited, postings = credits1 - credits0, credited1 - credited0, postings1 - postings0
    async with pool.acquire() as conn:
        pending = await conn.fetchval("SELECT coalesce(sum(cardinality(owners)), 0) FROM wallet.bulk_credit_parts")
    totals = await wallet.GetLedgerTotals(wallet_pb2.GetLedgerTotalsRequest(), metadata=OPERATOR)
    zero = all(Decimal(t.sum) == 0 for t in totals.totals)
    say(f"   complete after {fmt_s(total)}: GetPayoutStatus complete={status.complete}, items {status.items:,}, paid {paid} {ASSET};"
        f" wallet: {credits:,} credits from the expense account in {postings} BulkCredit postings, {credited.normalize():f} {ASSET};"
        f" ledger sums zero: {zero}; pending credits not yet folded by the wallet's background task: {pending:,}")
    if not (status.complete and status.items == n and credits == n and credited == paid and zero):
        raise AssertionError("the pipeline's payout is incomplete or inconsistent (see the line above)")

    # ---- the wallet folds the day's credits in the background (it would compete with the
    # SQL statement), then the SQL way on the copy, on the quiet database
    async def folded() -> bool:
        async with pool.acquire() as conn:
            return not await conn.fetchval("SELECT EXISTS (SELECT FROM wallet.bulk_credits WHERE folded_at IS NULL)")

    waited = await wait_for(folded, timeout=1800, what="the wallet folding the day's credits", every=1.0)
    say(f"   the wallet's background task folded the day's credits into transfers and balances {fmt_s(waited)} after the payout")
    t = now()
    settled = await quiet_database(pool)
    say(f"   before the SQL statement ({fmt_s(now() - t)}): {settled}; CHECKPOINT")
    async with pool.acquire() as conn:
        t = now()
        await conn.execute(BASELINE_PAYOUT, JOB, period, Decimal(24), boundary - 24, boundary)
        sql = now() - t
        rows, sql_paid = await conn.fetchrow("SELECT count(*), sum(amount) FROM sql_baseline.interest WHERE period = $1", period)
        differ = await conn.fetchval(
            "SELECT count(*) FROM sql_baseline.interest b JOIN simple_earn.interest p USING (position_id)"
            " JOIN simple_earn.payouts o ON o.id = p.payout_id WHERE b.period = $2 AND o.job = $1 AND o.period = $2 AND p.amount <> b.amount",
            JOB, period,
        )
        expense_after = await conn.fetchval("SELECT balance FROM sql_baseline.accounts WHERE owner = $1 AND kind = 'expense'", EXPENSE_OWNER)
    say(f"   SQL baseline (one statement, the services idle): {fmt_s(sql)} for {rows:,} payout rows, {sql_paid.normalize():f} {ASSET};"
        f" same total as the pipeline: {sql_paid == paid}; positions paid a different amount: {differ:,}; expense balance {expense_after.normalize():f}")
    say(f"   day {day}: pipeline {fmt_s(total)}, SQL {fmt_s(sql)}: {sql / total:.2f}x")
    breakdown(stack, book, watch, timeline, usage, w0, w1, wall0, wall_end, t_requested, total, sql)
    return Day(day, total, sql)


def report(book: Book, days: list[Day]) -> None:
    """The verdict: the median of the days' ratios. Each day's pipeline and SQL statement
    run minutes apart, so a slow moment of the shared machine weighs on one day's pair,
    not on the verdict."""
    n = book.size
    say("\nRESULT")
    for line in SUMMARY:
        say(f"   {line}")
    for d in days:
        say(f"   day {d.day}: pipeline (RequestPayout -> last batch recorded, all {n:,} credits committed in the wallet): {fmt_s(d.pipeline)}"
            f" = {n / d.pipeline:,.0f} positions/s; SQL, one set-based statement on a copy of the same data: {fmt_s(d.sql)}"
            f" = {n / d.sql:,.0f} positions/s; {d.ratio:.2f}x")
    ratio = statistics.median(d.ratio for d in days)
    verdict = "meets" if ratio >= 3 else "misses"
    say(f"   pipeline speed / SQL speed, the median of {len(days)} day(s) = {ratio:.2f}x"
        f" (days {', '.join(f'{d.ratio:.2f}x' for d in days)}; pipeline median {fmt_s(statistics.median(d.pipeline for d in days))},"
        f" SQL median {fmt_s(statistics.median(d.sql for d in days))}; target >= 3x faster: {verdict} it)")


def breakdown(
    stack: Stack, book: Book, watch: Watch, timeline: list[tuple[float, int, float]], usage: dict[str, float],
    w0: dict[str, float], w1: dict[str, float], wall0: float, wall_end: float, t_requested: float, total: float, sql: float,
) -> None:
    n = book.size
    say("\nWHERE THE PIPELINE'S TIME WENT (times in seconds after RequestPayout was called)")
    say(f"   {t_requested:7.2f}  RequestPayout returned (Simple Earn wrote the payout_requests row and 6 outbox rows)")
    start = min(watch.requested) if watch.requested else wall0
    if watch.requested:
        say(f"   {start - wall0:7.2f}  PayoutRequested in Kafka in all 6 partitions (Simple Earn's outbox relay)")
    by_partition: dict[int, list[SeenBatch]] = {}
    for b in watch.batches:
        by_partition.setdefault(b.partition, []).append(b)
    order = sorted(by_partition, key=lambda p: min(b.produced for b in by_partition[p]))
    say("            engine: one agent, so one partition after another; a partition's batches leave as they fill:")
    compute = 0.0
    for p in order:
        bs = by_partition[p]
        first, last = min(b.produced for b in bs), max(b.produced for b in bs)
        items = sum(b.items for b in bs)
        spent = last - start  # from the previous partition's last batch to this one's
        compute += spent
        say(f"   {first - wall0:7.2f}  partition {p}: {items:,} positions, {len(bs)} batches, the last sent at {last - wall0:.2f}"
            f" ({spent:5.2f} s after the partition before, {spent / max(1, items) * 1e6:5.1f} µs each)")
        start = last
    engine_done = max(b.produced for b in watch.batches) - wall0
    ref = IN_PROCESS.get("payout_us_per_position")
    say(f"            engine total: {compute / n * 1e6:.1f} µs per position"
        + (f"; the same domain work in-process, without faust tables, changelog and Kafka: {ref:.1f} µs" if ref else ""))
    # How long the engine kept a core busy after its last batch (faust flushing the
    # changelog of the N rewritten positions), competing with Simple Earn for the CPU.
    busy_until = engine_done
    for (t1, *_, c1), (t2, *_, c2) in zip(timeline, timeline[1:]):
        if t2 > engine_done and (c2 - c1) / max(1e-9, t2 - t1) > 0.3:
            busy_until = t2
    cpu_at_done = next((row[-1] for row in timeline if row[0] >= engine_done), timeline[-1][-1])
    say(f"   {busy_until:7.2f}  engine idle again: after its last batch it still used {timeline[-1][-1] - cpu_at_done:.1f} CPU-s"
        f" (faust commits, the changelog of one payout record per product); {timeline[-1][-1]:.1f} CPU-s in all")
    applied = simple_earn_batches(stack.earn.logfile, wall0)
    paid = [a for a in applied if a[3] == "paid"]
    if not paid:
        return
    calls = metric_sum(w1, "grpc_server_handling_seconds_count", grpc_method="BulkCredit") - metric_sum(w0, "grpc_server_handling_seconds_count", grpc_method="BulkCredit")
    wallet_s = metric_sum(w1, "grpc_server_handling_seconds_sum", grpc_method="BulkCredit") - metric_sum(w0, "grpc_server_handling_seconds_sum", grpc_method="BulkCredit")
    first_available = min(b.produced for b in watch.batches) - wall0
    say(f"   {paid[0][0] - wall0:7.2f}  Simple Earn applied its first batch (available in Kafka at {first_available:.2f})")
    say(f"   {paid[-1][0] - wall0:7.2f}  Simple Earn applied its last batch: payout complete ({total:.2f} s end to end,"
        f" {paid[-1][0] - wall0 - engine_done:.2f} s after the engine's last batch)")
    produced_at = sorted(b.produced for b in watch.batches)
    backlog = max(sum(1 for p in produced_at if p <= a[0]) - i for i, a in enumerate(paid))
    gaps = [(b[0] - wall0, b[0] - a[0]) for a, b in zip(paid, paid[1:])]
    during = [g for t, g in gaps if t <= busy_until]
    after = [g for t, g in gaps if t > busy_until]
    busy = paid[-1][0] - (first_available + wall0)
    per_batch = busy / len(paid)
    per_item = busy / n
    say(f"   Kafka: up to {backlog} batches waited in Kafka for Simple Earn")
    say(f"   Simple Earn's consumer (per partition, up to 4 batches at once): {len(paid)} batches, {per_batch:.2f} s per batch of ~{n // len(paid):,},"
        f" {per_item * 1e6:.0f} µs per item"
        + (f"; median gap {statistics.median(during):.2f} s while the engine was busy, {statistics.median(after):.2f} s after" if during and after else ""))
    say(f"     wallet BulkCredit, server side: {int(calls)} calls, {wallet_s:.2f} s = {wallet_s / max(1, calls):.2f} s per call,"
        f" {wallet_s / busy * 100:.0f}% of the consumer's time")
    say(f"     Simple Earn's own work: {busy - wallet_s:.2f} s = {(busy - wallet_s) / busy * 100:.0f}% (one transaction records the batch: items"
        " checked against positions, payout item arrays, inbox, batch row; then marks it posted)")
    se_cpu, se_pg = usage.get("Simple Earn process", 0.0), usage.get("PostgreSQL backends of simple_earn", 0.0)
    w_cpu, w_pg = usage.get("wallet process", 0.0), usage.get("PostgreSQL backends of wallet", 0.0)
    say(f"     CPU per item: Simple Earn process {se_cpu / n * 1e6:.0f} µs + its PostgreSQL backends {se_pg / n * 1e6:.0f} µs;"
        f" wallet process {w_cpu / n * 1e6:.0f} µs + its backends {w_pg / n * 1e6:.0f} µs (BulkCredit, relay, background fold);"
        f" engine {usage.get('accrual engine process', 0.0) / n * 1e6:.0f} µs; Kafka broker {usage.get('Kafka broker (java)', 0.0) / n * 1e6:.0f} µs;"
        f" the SQL statement: {sql / n * 1e6:.0f} µs wall")
    critical = "Simple Earn's payout consumer" if paid[-1][0] - wall0 - engine_done > 0.25 * total else "the engine"
    say(f"   critical path: {critical} (engine done at {engine_done:.2f} s of {total:.2f} s)")
    say(f"   CPU seconds during the payout ({total:.1f} s wall on 2 cores = {2 * total:.0f} CPU-s available):")
    for label, seconds in sorted(usage.items(), key=lambda kv: -kv[1]):
        if seconds >= 0.05:
            say(f"     {label:<45} {seconds:8.1f} s  ({seconds / total * 100:5.1f}% of one core)")


# ------------------------------------------------------------------ main


async def main(args: argparse.Namespace) -> None:
    header("Accrual benchmark: HourClosed cost, and a daily payout through engine -> Kafka -> Simple Earn -> wallet vs one SQL statement")
    n = args.positions
    h0 = unix_hour(datetime.now(UTC)) - 48
    t = now()
    book = make_book(n, h0)
    tiers = ", ".join(f"<= {u or 'inf'} at {a}" for u, a in TIERS)
    say(f"positions: {n:,}, one flexible product {PRODUCT} ({ASSET}, tiers {tiers}),"
        f" principals log-uniform 10 .. 50,000 {ASSET}, all accruing from hour h0 = {h0}; generated in {fmt_s(now() - t)}")
    started = now()
    if not args.skip_in_process:
        await in_process(book, sorted({min(1_000, n), n}), args.ticks)
        gc.collect()  # the in-process engine's state is gone with the call
    if not args.skip_pipeline:
        await pipeline(book, args.e2e_ticks, args.days)
    load = os.getloadavg()
    say(f"\nwhole run: {fmt_s(now() - started)} (+ {fmt_s(started - t)} generating the positions); load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=1_000_000, help="open positions (default 1,000,000)")
    parser.add_argument("--ticks", type=int, default=60_000, help="in-process HourClosed ticks per size (default 60,000)")
    parser.add_argument("--e2e-ticks", type=int, default=20, help="end-to-end HourClosed ticks per size (default 20)")
    parser.add_argument("--days", type=int, default=3, help="daily payouts, each next to the SQL statement; the verdict is their median ratio (default 3)")
    parser.add_argument("--skip-in-process", action="store_true", help="skip part 1a")
    parser.add_argument("--skip-pipeline", action="store_true", help="part 1a only (no servers)")
    asyncio.run(main(parser.parse_args()))
