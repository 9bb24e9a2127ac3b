"""HODLer Airdrop's business metrics. Labels are outcomes, statuses and assets, never
users or airdrops. Counters move only after the fact committed."""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import Counter, Gauge

EVENTS = Counter(
    "earn_hodler_events_total",
    "Wallet postings consumed, by outcome: applied, duplicate, ignored (no counted holding changed), dead_letter.",
    ["outcome"],
)
AIRDROPS = Gauge("earn_hodler_airdrops", "Airdrops by status (upcoming, active, ended, distributed).", ["status"])
AIRDROPS_DISTRIBUTED = Counter("earn_hodler_airdrops_distributed_total", "Airdrops whose rewards were all paid.")
REWARDS_PAID = Counter("earn_hodler_rewards_paid_total", "Rewards paid, in units of the reward asset.", ["asset"])


def amount(counter: Counter, asset: str, value: Decimal) -> None:
    if value > 0:
        counter.labels(asset).inc(float(value))
