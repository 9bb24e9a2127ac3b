"""Crypto Loan LTV monitor: 100,000 open loans, one price shock that moves a quarter of them
across the margin-call level; the time from the tick to the last margin-call action.

Part 1, in-process (the engine's pure monitor, ``services.accrual.loan.LtvMonitor``: no
faust, no Kafka): the loans are BTC-collateralised USDT loans (1 in 100 also pledges ETH, so it
depends on two prices and is judged on every BTC tick), with debts spread so that their
margin-call prices are spread evenly between 40,000 and 80,000 USDT; BTC stands at
100,000, then one tick at the price that puts 25% of the loans at or over 80%.

Part 2, end to end through Kafka (``--skip-e2e`` leaves it out): the same loans as
``LoanStateChanged`` events on a scratch ``loan.ltv``, the accrual engine as a process
(its loan agent), then the shock as a ``PriceTick`` on ``market.prices``; measured from
the tick's send to the last margin-call action read from ``loan.actions`` (in
``LoanActions`` batches: the engine copies the tick into every partition, judges, sends
one batch per partition and 1,000 actions, writes the changed arming to its table).

    .venv/bin/python -m tests.bench.bench_loan_ltv [--loans N] [--share 0.25] [--skip-e2e]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from earn.v1 import loan_pb2
from services.accrual.loan import Kind, LtvMonitor
from services.kernel import events, topics
from services.kernel.config import Settings
from services.loan.domain import Collateral, Levels, Loan
from services.market import domain as market_domain
from services.market.simulator import tick_envelope
from tests.bench._common import header, metric_sum, scrape, spawn
from tests.conftest import delete_topics_and_groups


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loans", type=int, default=100_000)
    parser.add_argument("--share", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    header(f"Crypto Loan LTV monitor: {args.loans:,} open loans, a price shock moving {args.share:.0%} across the margin-call level (in-process)")
    rng = random.Random(args.seed)
    levels = Levels()
    monitor = LtvMonitor()
    monitor.price("BTC", Fraction(100_000), 0)
    monitor.price("ETH", Fraction(3_000), 0)
    t0 = time.perf_counter()
    mc_prices = []
    loans_made: list[tuple[str, str, Loan]] = []
    for i in range(args.loans):
        btc = rng.randint(10**7, 5 * 10**8)  # 0.1 to 5 BTC
        mc_price = Fraction(rng.randint(40_000 * 100, 80_000 * 100 - 1), 100)  # the BTC price of an 80% LTV
        debt = int(Fraction(btc, 10**8) * mc_price * Fraction(80, 100) * 10**6)  # USDT units
        collateral = [Collateral("BTC", 8, btc, Fraction(1))]
        if i % 100 == 99:
            collateral.append(Collateral("ETH", 18, 10**15, Fraction(90, 100)))  # 0.001 ETH
        loan = Loan("USDT", 6, debt, 0, Fraction(5, 10**6), 10**9, 10**9 - 1, collateral=collateral)
        loans_made.append((f"L{i:06d}", f"u{i}", Loan("USDT", 6, debt, 0, Fraction(5, 10**6), 10**9, 10**9 - 1, collateral=list(collateral))))
        monitor.upsert(f"L{i:06d}", f"u{i}", 1, loan, levels)
        mc_prices.append(Fraction(debt, 10**6) / (Fraction(btc, 10**8) * Fraction(80, 100)))
    build = time.perf_counter() - t0
    print(f"1. {args.loans:,} loans indexed in {build:.2f} s ({build / args.loans * 1e6:.1f} µs per loan)")

    # ticks that cross nothing: the cost of a tick is the log n lookup (plus the multi-price loans)
    quiet = []
    for t in range(1, 201):
        p = Fraction(rng.randint(95_000 * 100, 105_000 * 100), 100)
        s = time.perf_counter()
        acts = monitor.price("BTC", p, t)
        quiet.append(time.perf_counter() - s)
        assert not [a for a in acts if a.kind is Kind.MARGIN_CALL]
    print(f"2. a BTC tick crossing nothing (200 ticks between 95,000 and 105,000): median {statistics.median(quiet) * 1e3:.3f} ms,"
          f" max {max(quiet) * 1e3:.3f} ms (judges the {args.loans // 100:,} two-price loans, none of the others)")

    ordered = sorted(mc_prices, reverse=True)
    shock = ordered[int(args.loans * args.share) - 1]
    shock = Fraction(int(shock * 100), 100)  # a price at the quote's scale, at or below the quarter's trigger
    expected = sum(1 for p in mc_prices if p >= shock)
    judged_before = monitor.judged
    s = time.perf_counter()
    acts = monitor.price("BTC", shock, 1000)
    calls = [a for a in acts if a.kind is Kind.MARGIN_CALL]
    elapsed = time.perf_counter() - s
    judged = monitor.judged - judged_before
    print(f"3. shock: BTC 100,000 -> {float(shock):,.2f}: {len(calls):,} margin calls ({len(calls) / args.loans:.1%} of the loans;"
          f" reference count {expected:,}), {judged:,} loans judged")
    print(f"   time from the tick to the last margin-call action: {elapsed * 1e3:.1f} ms (target < 1 s: {'met' if elapsed < 1 else 'MISSED'})")
    assert len(calls) == expected, (len(calls), expected)
    # the same shock again: nothing new (one margin call per crossing)
    again = [a for a in monitor.price("BTC", shock - Fraction(1, 100), 1001) if a.kind is Kind.MARGIN_CALL]
    print(f"4. the next tick 0.01 lower: {len(again):,} new margin calls (only loans whose trigger lies in that cent)")
    if not args.skip_e2e:
        asyncio.run(e2e(loans_made, shock, expected))


def state_event(loan_id: str, user: str, loan: Loan) -> bytes:
    msg = loan_pb2.LoanStateChanged(
        loan_id=loan_id, user_id=user, version=1, status=loan_pb2.LOAN_STATUS_OPEN, loan_asset=loan.loan_asset,
        principal_units=str(loan.principal), interest_units="0", interest_carry_e10=0, hourly_rate="0.000005", start_hour=loan.start_hour,
        charged_through=loan.charged_through, margin_call_ltv="0.8", liquidation_ltv="0.9", rearm_band="0.01", initial_ltv="0.7",
        liquidation_fee="0.02",
        collateral=[loan_pb2.LoanCollateral(asset=c.asset, amount=str(c.amount), discount=str(Decimal(c.discount.numerator) / c.discount.denominator))
                    for c in loan.collateral],
    )
    return events.wrap(msg, key=loan_id, producer="bench", occurred_at=datetime.now(UTC)).SerializeToString()


async def e2e(loans: list[tuple[str, str, Loan]], shock: Fraction, expected: int) -> None:
    prefix = f"benchloan{uuid.uuid4().hex[:6]}."
    settings = Settings(topic_prefix=prefix)
    print(f"\n5. end to end through Kafka: {len(loans):,} LoanStateChanged on {prefix}loan.ltv, the accrual engine as a process")
    await asyncio.to_thread(topics.ensure_topics, settings, ["loan.ltv", "market.prices", "loan.actions"])
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    engine = None
    try:
        btc, eth = market_domain.parse_pair("BTC/USDT"), market_domain.parse_pair("ETH/USDT")
        now = datetime.now(UTC).replace(microsecond=0)
        await producer.send(prefix + "market.prices", tick_envelope(btc, Decimal(100000), now, "bench"), key=b"BTC/USDT")
        await producer.send(prefix + "market.prices", tick_envelope(eth, Decimal(3000), now, "bench"), key=b"ETH/USDT")
        for loan_id, user, loan in loans:
            await producer.send(prefix + "loan.ltv", state_event(loan_id, user, loan), key=loan_id.encode())
        await producer.flush()
        log_dir = Path(tempfile.mkdtemp(prefix="bench-loan-"))
        engine = spawn("accrual", {"EARN_TOPIC_PREFIX": prefix, "EARN_LOG_LEVEL": "WARNING"}, log_dir)
        engine.start()
        await asyncio.to_thread(engine.wait_ready, 120)
        started = time.perf_counter()
        assert engine.metrics_url
        while True:
            try:
                done = metric_sum(scrape(engine.metrics_url), "earn_accrual_loan_events_total", type="LoanStateChanged")
            except OSError:  # not listening yet
                done = 0
            if done >= len(loans):
                break
            if engine.returncode is not None:
                raise SystemExit(f"the engine exited; see {engine.logfile}")
            await asyncio.sleep(1.0)
        print(f"   the engine applied the {len(loans):,} loans in {time.perf_counter() - started:.1f} s after it was ready (set-up, not measured)")
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False, group_id=None)
        await consumer.start()
        tps = [TopicPartition(prefix + "loan.actions", p) for p in range(topics.CATALOGUE["loan.actions"].partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        calls = batches = 0
        sent = time.perf_counter()
        await producer.send_and_wait(prefix + "market.prices", tick_envelope(btc, Decimal(shock.numerator) / shock.denominator, datetime.now(UTC), "bench"),
                                     key=b"BTC/USDT")
        last = sent
        deadline = time.monotonic() + 300
        while calls < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500, max_records=5000)).values():
                for r in records:
                    batch = events.unwrap(events.parse(r.value), loan_pb2.LoanActions)
                    n = sum(1 for a in batch.actions if a.kind == loan_pb2.LOAN_EVENT_KIND_MARGIN_CALL)
                    if n:
                        calls += n
                        last = time.perf_counter()
                        batches += 1
        await consumer.stop()
        elapsed = last - sent
        print(f"6. shock through Kafka: {calls:,} margin-call actions read from loan.actions in {batches:,} LoanActions batches (expected {expected:,})")
        print(f"   time from the tick's send to the last margin-call action read: {elapsed * 1e3:.0f} ms (target < 1 s: {'met' if elapsed < 1 and calls == expected else 'MISSED'})")
    finally:
        if engine is not None:
            engine.stop()
        await producer.stop()
        await asyncio.to_thread(delete_topics_and_groups, settings, prefix)


if __name__ == "__main__":
    main()
