"""CandyDrop's business metrics. Labels are topics, outcomes and assets, never users or
campaigns. Counters move only after the fact committed."""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import Counter

EVENTS = Counter(
    "earn_candydrop_events_total",
    "Events consumed, by topic and outcome: counted, not_counted (no open task of a registered user), duplicate, ignored, dead_letter.",
    ["topic", "outcome"],
)
REGISTRATIONS = Counter("earn_candydrop_registrations_total", "Register calls answered OK (a repeat included).")
CAMPAIGNS_DISTRIBUTED = Counter("earn_candydrop_campaigns_distributed_total", "Campaigns whose prizes were all paid.")
PRIZES_PAID = Counter("earn_candydrop_prizes_paid_total", "Prizes paid, in units of the prize asset.", ["asset"])


def amount(counter: Counter, asset: str, value: Decimal) -> None:
    if value > 0:
        counter.labels(asset).inc(float(value))
