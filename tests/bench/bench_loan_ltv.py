"""Crypto Loan LTV monitor: 100,000 open loans, one price shock that moves a quarter of them
across the margin-call level; the time from the tick to the last margin-call action.

In-process (the engine's pure monitor, ``services.accrual.loan.LtvMonitor``: no faust, no
Kafka): the loans are BTC-collateralised USDT loans (1 in 100 also pledges ETH, so it
depends on two prices and is judged on every BTC tick), with debts spread so that their
margin-call prices are spread evenly between 40,000 and 80,000 USDT; BTC stands at
100,000, then one tick at the price that puts 25% of the loans at or over 80%.

    .venv/bin/python -m tests.bench.bench_loan_ltv [--loans N] [--share 0.25]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from fractions import Fraction

from services.accrual.loan import Kind, LtvMonitor
from services.loan.domain import Collateral, Levels, Loan
from tests.bench._common import header


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loans", type=int, default=100_000)
    parser.add_argument("--share", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    header(f"Crypto Loan LTV monitor: {args.loans:,} open loans, a price shock moving {args.share:.0%} across the margin-call level (in-process)")
    rng = random.Random(args.seed)
    levels = Levels()
    monitor = LtvMonitor()
    monitor.price("BTC", Fraction(100_000), 0)
    monitor.price("ETH", Fraction(3_000), 0)
    t0 = time.perf_counter()
    mc_prices = []
    for i in range(args.loans):
        btc = rng.randint(10**7, 5 * 10**8)  # 0.1 to 5 BTC
        mc_price = Fraction(rng.randint(40_000 * 100, 80_000 * 100 - 1), 100)  # the BTC price of an 80% LTV
        debt = int(Fraction(btc, 10**8) * mc_price * Fraction(80, 100) * 10**6)  # USDT units
        collateral = [Collateral("BTC", 8, btc, Fraction(1))]
        if i % 100 == 99:
            collateral.append(Collateral("ETH", 18, 10**15, Fraction(90, 100)))  # 0.001 ETH
        loan = Loan("USDT", 6, debt, 0, Fraction(5, 10**6), 10**9, 10**9 - 1, collateral=collateral)
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


if __name__ == "__main__":
    main()
