"""Launchpool benchmark: an hour of one pool with N stakers (default 1,000,000), in the
engine's own code (``services.accrual.launchpool_agent.LaunchpoolEngine.in_memory``:
plain dicts instead of faust tables, batches delivered at once; envelopes parsed as from
Kafka; no broker, no database).

1. N stakers enter the pool at distinct microseconds of its first hour, with distinct
   amounts (so the pool's stake changes at every event and its accumulator's
   denominator grows until the cap): the cost per stake change at 1,000 stakers and at
   N stakers (the method's claim: it does not grow).
2. Closing the hour (HourClosed): the accumulator advanced to the boundary and recorded,
   at 1,000 and at N stakers.
3. Paying everyone the hour (PayoutRequested): each stake's floor(E(B)) - floor(E(P)), the
   PayoutBatch columns of 5,000 built and serialised; checked: the total paid is at most
   the hour's reward and short of it by less than one unit per staker.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from datetime import UTC, datetime
from fractions import Fraction

from earn.v1 import accrual_pb2, launchpool_pb2
from services.accrual import launchpool as lp
from services.accrual.launchpool_agent import LaunchpoolEngine
from services.kernel import events
from tests.bench._common import header

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


async def run(stakers: int) -> None:
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
        msg = events.unwrap(events.parse(raw[i]), launchpool_pb2.LaunchpoolStakeChanged)
        stake = lp.apply_stake_change(pool, None, stake_id=msg.stake_id, user_id=msg.user_id, delta_units=_units(msg.delta),
                                      at_us=msg.at_micros, offset=offset)
        assert stake is not None
        book[stake.stake_id] = stake
        engine.stakes[f"0:bench:{stake.stake_id}"] = json.dumps(stake.to_dict(), separators=(",", ":"))
    engine.save_pool(0, pool)
    late = await through_the_agent(stakers - edge, stakers)
    loaded = time.perf_counter() - started
    pool = engine.pool(0, "bench")
    assert pool is not None and len(engine.book(0, "bench")) == stakers
    say(f"1. {stakers:,} stake changes applied in {loaded:.1f} s ({stakers / loaded:,.0f}/s)")
    say(f"   per change through the agent (envelope parsed, pool and stake read and written): the first {edge:,} stakers {early:.1f} µs,"
        f" the last {edge:,} (at {stakers:,} stakers) {late:.1f} µs; accumulator denominator {len(str(pool.acc.denominator))} digits"
        f" (cap {len(str(lp.ACC_CAP))})")

    # 2. Close the hour: the median of repeated closes of fresh copies (each one real work).
    saved = engine.pools["0:bench"]
    times = []
    for _ in range(200):
        engine.pools["0:bench"] = saved
        t0 = time.perf_counter()
        engine.on_hour(0, START + 1)
        times.append(time.perf_counter() - t0)
    say(f"2. HourClosed with {stakers:,} stakers: median {statistics.median(times) * 1e6:.0f} µs, p99 {sorted(times)[int(len(times) * 0.99)] * 1e6:.0f} µs"
        " (the pool's accumulator advanced to the boundary and recorded; no stake touched)")

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
    undistributed = pool.undistributed * 10**6  # before the first staker entered
    shortfall = hour - undistributed - paid
    say(f"3. payout of the hour to {stakers:,} stakers: {elapsed:.2f} s wall, {cpu:.2f} s CPU = {elapsed / stakers * 1e6:.1f} µs per staker;"
        f" {items:,} items in {batches} PayoutBatch messages (built and serialised)")
    say(f"   paid {paid / 10**6:,.6f} USDT of the hour's {float(hour) / 10**6:,.6f} ({float(undistributed) / 10**6:,.6f} not distributed:"
        f" before the first staker); rounding dust {float(shortfall):,.0f} units (< one unit per staker: {shortfall < stakers})")
    assert 0 <= shortfall < stakers


async def main(args: argparse.Namespace) -> None:
    header(f"Launchpool benchmark: one pool, {args.stakers:,} stakers, an hour closed and paid (engine in-process)")
    await run(args.stakers)
    if args.small and args.stakers > 1_000:
        say("\nthe same with 1,000 stakers:")
        await run(1_000)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stakers", type=int, default=1_000_000, help="stakers in the pool (default 1,000,000)")
    parser.add_argument("--small", action="store_true", help="also run with 1,000 stakers")
    asyncio.run(main(parser.parse_args()))
