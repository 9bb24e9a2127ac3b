"""Seeded chaos runner: `make chaos SEEDS=N [SEED=s]`.

First step of issue 8's chaos runner. For each seed it runs the seeded chaos scenarios of
the end-to-end tests with EARN_CHAOS_SEED=<seed>: Simple Earn and Launchpool (the accrual
engine, the scheduler and Launchpool SIGKILLed at seeded random moments and restarted, the
wallet and payouts compared with a calm run and the Fraction reference), Dual and Smart
Leverage settlement (the service and the CLI killed; one payout per subscription), Crypto
Loan (the engine killed during a crash; each loan liquidated once), CandyDrop and HODLer
Airdrop (the service killed while it consumes and while it pays), through
pytest and the suite's fixtures. A failing seed is printed with its replay command; the
exit code is 1 if any seed failed.

The `mixed` scenario (tests/integration/test_chaos_infra.py) starts its own PostgreSQL and
Kafka on free ports and, during a seeded mixed workload (deposits, Simple Earn, Launchpool,
ticks and payouts, Crypto Loan borrows, repayments and collateral, Dual subscriptions,
Smart Leverage positions, a CandyDrop campaign and a HODLer airdrop, and a seeded index path
that margin-calls and liquidates loans and settles the Dual plans and the leverage
positions), SIGKILLs each of the wallet, its relay, Simple Earn, Launchpool, the market,
Crypto Loan, Dual, Smart Leverage, CandyDrop, HODLer, the engine, the scheduler CLI, the
broker and the postmaster; then the ledger sums to zero per asset, no user account is
negative, every outbox is empty, every loan is liquidated at most once, every leverage
position, prize and airdrop reward is paid once, and the wallet, payout, loan, Dual,
leverage, prize and reward records equal the calm run's.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys

SCENARIOS = {
    "simple_earn": "tests/integration/test_simple_earn_e2e.py::test_sigkilled_engine_and_scheduler_leave_the_wallet_as_a_calm_run",
    "launchpool": "tests/integration/test_launchpool_e2e.py::test_sigkilled_engine_and_scheduler_lose_nothing_and_pay_nothing_twice",
    "dual": "tests/integration/test_dual_e2e.py::test_settlement_killed_and_rerun_pays_exactly_once",
    "leverage": "tests/integration/test_leverage_e2e.py::test_settlement_killed_and_rerun_pays_exactly_once",
    "loan": "tests/integration/test_loan_e2e.py::test_engine_killed_during_a_crash_liquidates_each_loan_once",
    "candydrop": "tests/integration/test_candydrop_e2e.py::test_candydrop_end_to_end_and_with_kills",
    "mixed": "tests/integration/test_chaos_infra.py::test_mixed_chaos_kills_services_broker_and_database_and_loses_nothing",
    "hodler": "tests/integration/test_hodler_e2e.py::test_hodler_end_to_end_and_with_kills",
}


def run_seed(seed: int, products: list[str]) -> bool:
    env = {**os.environ, "EARN_CHAOS_SEED": str(seed)}
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", *(SCENARIOS[p] for p in products)], env=env)
    return code == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds to run")
    parser.add_argument("--seed", type=int, default=None, help="run this seed (replay) instead of random ones")
    parser.add_argument("--products", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    args = parser.parse_args(argv)
    products = [p for p in args.products.split(",") if p]
    unknown = [p for p in products if p not in SCENARIOS]
    if unknown:
        parser.error(f"unknown products {unknown}; known: {list(SCENARIOS)}")
    seeds = [args.seed] if args.seed is not None else [random.randrange(1 << 30) for _ in range(args.seeds)]
    failed = []
    for seed in seeds:
        print(f"chaos: seed {seed}", flush=True)
        if not run_seed(seed, products):
            print(f"chaos: seed {seed} FAILED; replay with `make chaos SEEDS=1 SEED={seed}`"
                  f" (or `python -m tests.chaos.run_chaos --seed {seed} --products {','.join(products)}`)", flush=True)
            failed.append(seed)
    print(f"chaos: {len(seeds) - len(failed)}/{len(seeds)} seeds passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
