"""Launchpool benchmark: an hour of one pool with N stakers (default 1,000,000), in the
engine's own code (``services.accrual.launchpool_agent.LaunchpoolEngine.in_memory``:
plain dicts instead of faust tables, batches delivered at once; envelopes parsed as from
Kafka; no broker, no database).

1. N stakers enter the pool at distinct microseconds of its first hour, with distinct
   amounts (so the pool's stake changes at every event): the cost per stake change at
   1,000 stakers and at N stakers (the method's claim: it does not grow).
2. Closing the hour (HourClosed): the pool's A advanced by the hour's reward / the pool's
   integral over the hour and recorded, and the N stakes changed in the hour settled
   (each its exact reward for the hour, written to the table): once, per changed stake.
   Then closing the next hour, in which nothing changed (nothing settled): the median of
   repeated closes.
3. Paying everyone the hour (PayoutRequested): each stake's floor(E(B)) - floor(E(P)), the
   PayoutBatch columns of 5,000 built and serialised; checked: the total paid is at most
   the hour's reward and short of it by less than one unit per staker.
4. The same batches paid for real: produced to launchpool.payouts (with every
   partition's last batch) for a live Launchpool service and wallet (a scratch database
   holding the N stakes, written with COPY; the payout requested through gRPC), until
   GetRewardPayoutStatus reports the payout complete: every reward recorded and every
   credit committed by the wallet's BulkCredit. Checked: the expense account paid exactly
   the batches' total.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import asyncpg
from services.kernel import grpcclient
from aiokafka import AIOKafkaProducer

from earn.v1 import accrual_pb2, launchpool_pb2, launchpool_pb2_grpc, wallet_pb2, wallet_pb2_grpc
from services.accrual import launchpool as lp
from services.accrual.launchpool_agent import LaunchpoolEngine
from services.kernel import events
from services.kernel.clock import set_time
from services.kernel.config import Settings
from tests.bench._common import CpuMeter, drop_database, header, recreate_database, spawn
from tests.conftest import OPERATOR, SERVICE, delete_topics_and_groups

START = int(datetime(2031, 1, 1, tzinfo=UTC).timestamp()) // 3600
HOURS = 24
TOTAL = "24000"  # USDT: 1,000 an hour


class _Sink:
    """The output topic, in-process: keeps the serialised batches (read after the timing)."""

    def __init__(self) -> None:
        self.values: list[bytes] = []

    async def send(self, *, key: bytes, value: bytes, partition: int, force: bool):  # type: ignore[no-untyped-def]
        self.values.append(value)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def totals(self) -> tuple[int, int, int]:
        """(batches, items, units of 10**-6 paid)."""
        items = units = 0
        for value in self.values:
            batch = events.unwrap(events.parse(value), accrual_pb2.PayoutBatch)
            items += len(batch.amounts)
            for amount in batch.amounts:
                whole, _, frac = amount.partition(".")
                units += int(whole) * 10**6 + int((frac + "000000")[:6])
        return len(self.values), items, units


def envelope(message, key: str) -> bytes:  # type: ignore[no-untyped-def]
    return events.wrap(message, key=key, producer="bench", occurred_at=datetime.now(UTC)).SerializeToString()


def _units(delta: str) -> int:
    whole, _, frac = delta.partition(".")
    return int(whole) * lp.STAKE_UNIT + int((frac + "0" * lp.STAKE_SCALE)[: lp.STAKE_SCALE])


def say(text: str) -> None:
    print(text, flush=True)


async def run(stakers: int) -> list[tuple[int, bytes]]:
    sink = _Sink()
    engine = LaunchpoolEngine.in_memory(sink, 6)
    offset = 0
    await engine.apply(0, offset, envelope(launchpool_pb2.LaunchpoolPoolSet(
        pool_id="bench", project_id="bench", reward_asset="USDT", total_reward=TOTAL, start_hour=START, end_hour=START + HOURS), "bench"))
    # The events, prepared up front (their encoding is not the engine's cost).
    step = max(1, 3_600_000_000 // (stakers + 1))
    raw = [
        envelope(launchpool_pb2.LaunchpoolStakeChanged(
            pool_id="bench", stake_id=str(i + 1), user_id=f"user{i + 1}", delta=f"{100 + (i * 7919) % 100000}.{i % 1000:03d}",
            at_micros=START * lp.HOUR_US + (i + 1) * step), "bench")
        for i in range(stakers)
    ]
    gc.collect()
    gc.freeze()
    edge = min(1_000, stakers // 2)

    async def through_the_agent(first: int, last: int) -> float:
        """Stake changes [first, last) as the agent gets them; µs per change."""
        nonlocal offset
        t0 = time.perf_counter()
        for i in range(first, last):
            offset += 1
            await engine.apply(0, offset, raw[i])
        return (time.perf_counter() - t0) / max(1, last - first) * 1e6

    started = time.perf_counter()
    early = await through_the_agent(0, edge)
    # The stakers in between: the same pure step the agent takes (without parsing their
    # envelopes), written to the tables the same way.
    pool = engine.pool(0, "bench")
    assert pool is not None
    book = engine.book(0, "bench")
    for i in range(edge, stakers - edge):
        offset += 1
        env = events.parse(raw[i])
        msg = events.unwrap(env, launchpool_pb2.LaunchpoolStakeChanged)
        writes = lp.apply_stake_change(pool, book, stake_id=msg.stake_id, user_id=msg.user_id, delta_units=_units(msg.delta),
                                       at_us=msg.at_micros, offset=offset, event_id=env.event_id)
        assert writes is not None
        for stake in writes:
            engine.state[f"s:0:bench:{stake.stake_id}"] = json.dumps(stake.to_dict(), separators=(",", ":"))
    engine.save_pool(0, pool)
    late = await through_the_agent(stakers - edge, stakers)
    loaded = time.perf_counter() - started
    pool = engine.pool(0, "bench")
    assert pool is not None and len(engine.book(0, "bench")) == stakers
    say(f"1. {stakers:,} stake changes applied in {loaded:.1f} s ({stakers / loaded:,.0f}/s)")
    say(f"   per change through the agent (envelope parsed, pool and stake read and written): the first {edge:,} stakers {early:.1f} µs,"
        f" the last {edge:,} (at {stakers:,} stakers) {late:.1f} µs")

    # 2. Close the hour: every stake changed in it is settled (once), then an hour without changes.
    t0 = time.perf_counter()
    engine.on_hour(0, START + 1)
    first = time.perf_counter() - t0
    pool = engine.pool(0, "bench")
    assert pool is not None and not engine.book(0, "bench").open
    say(f"2. HourClosed of the hour the {stakers:,} stakers entered: {first:.2f} s = {first / stakers * 1e6:.1f} µs per stake changed in the hour"
        f" (each settled exactly and written); A's denominator {len(str(pool.acc.denominator))} digits (cap {len(str(lp.ACC_CAP))})")
    saved = engine.state["p:0:bench"]
    times = []
    for _ in range(200):
        engine.state["p:0:bench"] = saved
        t0 = time.perf_counter()
        engine.on_hour(0, START + 2)
        times.append(time.perf_counter() - t0)
    engine.state["p:0:bench"] = saved
    say(f"   HourClosed of the next hour (no change in it) with {stakers:,} stakers: median {statistics.median(times) * 1e6:.0f} µs,"
        f" p99 {sorted(times)[int(len(times) * 0.99)] * 1e6:.0f} µs (A advanced and recorded; no stake touched)")

    # 3. Pay the hour to everyone.
    offset += 1
    request = accrual_pb2.PayoutRequested(job="launchpool.rewards.hourly", period="bench", boundary_hour=START + 1, product_ids=["bench"])
    value = envelope(request, "payout")
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    await engine.apply(0, offset, value)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    batches, items, paid = sink.totals()
    hour = Fraction(TOTAL) / HOURS * 10**6
    pool = engine.pool(0, "bench")
    assert pool is not None
    undistributed = pool.undistributed * 10**6  # 0: the hour had stakers
    shortfall = hour - undistributed - paid
    say(f"3. payout of the hour to {stakers:,} stakers: {elapsed:.2f} s wall, {cpu:.2f} s CPU = {elapsed / stakers * 1e6:.1f} µs per staker;"
        f" {items:,} items in {batches} PayoutBatch messages (built and serialised)")
    say(f"   paid {paid / 10**6:,.6f} USDT of the hour's {float(hour) / 10**6:,.6f} ({float(undistributed) / 10**6:,.6f} not distributed:"
        f" the hour had stakers); rounding dust {float(shortfall):,.0f} units (< one unit per staker: {shortfall < stakers})")
    assert 0 <= shortfall < stakers
    # Every other partition's answer to the request: its (empty) last batch.
    out = [(0, v) for v in sink.values]
    for partition in range(1, 6):
        sink.values = []
        await engine.apply(partition, 1, value)
        out += [(partition, v) for v in sink.values]
    return out


async def pipeline(stakers: int, batches: list[tuple[int, bytes]]) -> None:
    """Part 4: the batches through Kafka, Launchpool's consumer and the wallet."""
    say(f"\n4. the payout through launchpool.payouts -> Launchpool (record) -> wallet BulkCredit, {len(batches)} messages")
    base = Settings()
    run_id = uuid.uuid4().hex[:8]
    database, prefix = f"bench_lp_{run_id}", f"benchlp{run_id}."
    await recreate_database(base, database)
    clock = Path(tempfile.mkdtemp(prefix="clock-")) / "now"
    start = datetime.fromtimestamp(START * 3600, UTC)
    set_time(clock, start + timedelta(minutes=1))
    env = {**os.environ, "EARN_PG_DATABASE": database, "EARN_TOPIC_PREFIX": prefix, "EARN_LOG_LEVEL": "WARNING", "EARN_CLOCK_FILE": str(clock)}
    log_dir = base.data_dir / "bench-logs"
    wallet = spawn("wallet", env, log_dir)
    wallet.start()
    service = None
    pool = None
    try:
        wallet.wait_ready(60)
        service = spawn("launchpool", {**env, "EARN_WALLET_ADDRESS": wallet.address or ""}, log_dir)
        service.start()
        service.wait_ready(60)
        settings = Settings(pg_database=database, topic_prefix=prefix)
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
        assert pool is not None
        async with grpcclient.channel(service.address) as c1, grpcclient.channel(wallet.address) as c2:
            api, wallet_api = launchpool_pb2_grpc.LaunchpoolServiceStub(c1), wallet_pb2_grpc.WalletServiceStub(c2)
            t = launchpool_pb2.CreateProjectRequest(idempotency_key="bench-project", project_id="bench", reward_asset="USDT",
                                                    pools=[launchpool_pb2.RewardPoolSpec(pool_id="bench", stake_asset="USDT", total_reward=TOTAL,
                                                                                         min_stake="1", max_stake="1000000")])
            t.start_time.FromDatetime(start)
            t.end_time.FromDatetime(start + timedelta(hours=HOURS))
            await api.CreateProject(t, metadata=OPERATOR)
            t0 = time.perf_counter()
            await pool.copy_records_to_table(
                "stakes", schema_name="launchpool", columns=["id", "user_id", "pool_id", "amount", "created_at", "updated_at"],
                records=((i, f"user{i}", "bench", Decimal(100), start, start) for i in range(1, stakers + 1)),
            )
            await pool.execute("SELECT setval('launchpool.stakes_id_seq', $1)", stakers)
            await pool.execute("ANALYZE launchpool.stakes")
            say(f"   {stakers:,} stakes written with COPY in {time.perf_counter() - t0:.1f} s (set-up, not measured)")
            set_time(clock, start + timedelta(hours=1, minutes=5))
            await api.CloseRewardHour(launchpool_pb2.CloseRewardHourRequest(hour=START + 1), metadata=SERVICE)
            await api.RequestRewardPayout(launchpool_pb2.RequestRewardPayoutRequest(job="launchpool.rewards.hourly", period="bench",
                                                                                     boundary_hour=START + 1), metadata=SERVICE)
            producer = AIOKafkaProducer(bootstrap_servers=base.kafka_bootstrap, enable_idempotence=True, acks="all",
                                        max_request_size=8 * 1024 * 1024, linger_ms=2)
            await producer.start()
            cpu = CpuMeter({"launchpool process": service.pid or -1, "wallet process": wallet.pid or -1}, pool, database, every=0.2)
            await cpu.begin()
            t0 = time.perf_counter()
            try:
                topic = prefix + "launchpool.payouts"
                sent = [await producer.send(topic, value=v, key=b"bench", partition=p) for p, v in batches]
                await asyncio.gather(*sent)
            finally:
                await producer.stop()
            produced = time.perf_counter() - t0
            status_request = launchpool_pb2.GetRewardPayoutStatusRequest(job="launchpool.rewards.hourly", period="bench")
            while True:
                status = await api.GetRewardPayoutStatus(status_request, metadata=SERVICE)
                if status.complete:
                    break
                if time.perf_counter() - t0 > 900:
                    raise SystemExit(f"payout not complete after 900 s: {status}")
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - t0
            used = await cpu.end()
            paid = Decimal(status.paid["USDT"])
            say(f"   produced in {produced:.2f} s; complete (every reward recorded, every credit committed) {elapsed:.2f} s after the first send"
                f" = {status.items / elapsed:,.0f} credits/s; {status.items:,} credits, {paid} USDT")
            say(f"   CPU seconds meanwhile ({elapsed:.1f} s wall on {os.cpu_count()} cores):")
            for label, seconds in sorted(used.items(), key=lambda kv: -kv[1]):
                if seconds >= 0.05:
                    say(f"     {label:<44} {seconds:5.1f} s")
            balances = await wallet_api.GetBalances(wallet_pb2.GetBalancesRequest(owner="launchpool", asset="USDT"), metadata=OPERATOR)
            expense = sum((Decimal(b.balance) for b in balances.balances if b.kind == wallet_pb2.ACCOUNT_KIND_EXPENSE), Decimal(0))
            assert expense == -paid, (expense, paid)
            say(f"   checked: launchpool's expense account paid exactly {paid} USDT")
    finally:
        if pool is not None:
            await pool.close()
        for proc in (service, wallet):
            if proc is not None:
                proc.stop()
        await drop_database(base, database)
        await asyncio.to_thread(delete_topics_and_groups, base, prefix)


async def main(args: argparse.Namespace) -> None:
    header(f"Launchpool benchmark: one pool, {args.stakers:,} stakers, an hour closed and paid (engine in-process)")
    batches = await run(args.stakers)
    if not args.skip_pipeline:
        await pipeline(args.stakers, batches)
    if args.small and args.stakers > 1_000:
        say("\nthe same with 1,000 stakers:")
        await run(1_000)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stakers", type=int, default=1_000_000, help="stakers in the pool (default 1,000,000)")
    parser.add_argument("--small", action="store_true", help="also run with 1,000 stakers")
    parser.add_argument("--skip-pipeline", action="store_true", help="skip part 4 (Kafka, Launchpool, wallet)")
    asyncio.run(main(parser.parse_args()))
