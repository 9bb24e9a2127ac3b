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
LATE_CHANGES = Counter(
    "earn_hodler_late_changes_total",
    "Wallet postings stamped inside an airdrop's window that arrived after its distribution began: not counted in it."
    " Any is worth a look (a relay or consumer outage longer than the settle delay).",
)
REWARDS_PAID = Counter("earn_hodler_rewards_paid_total", "Rewards paid, in units of the reward asset.", ["asset"])


def amount(counter: Counter, asset: str, value: Decimal) -> None:
    if value > 0:
        counter.labels(asset).inc(float(value))
