"""Launchpool's business metrics. Labels are pools, assets and outcomes, never users.
Counters move only after the fact committed, and only the first time."""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import Counter

STAKED = Counter("earn_launchpool_staked_total", "Amount staked, in units of the stake asset.", ["pool", "asset"])
UNSTAKED = Counter("earn_launchpool_unstaked_total", "Amount unstaked, in units of the stake asset.", ["pool", "asset"])
REWARDS_PAID = Counter("earn_launchpool_rewards_paid_total", "Rewards paid, in units of the reward asset.", ["pool", "asset"])
PAYOUT_BATCHES = Counter(
    "earn_launchpool_payout_batches_total", "Launchpool PayoutBatch records consumed, by outcome: paid, duplicate, dead_letter.", ["outcome"]
)


def amount(counter: Counter, pool: str, asset: str, value: Decimal) -> None:
    if value > 0:
        counter.labels(pool, asset).inc(float(value))
