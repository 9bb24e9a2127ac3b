"""Dual Investment metrics. Labels are assets, directions and outcomes, never users or plans."""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import Counter

SUBSCRIBED = Counter("earn_dual_subscribed_total", "Amount subscribed, in units of the invested asset.", ["asset", "direction"])
PAID = Counter("earn_dual_paid_total", "Amount paid at settlement, in units of the payout asset.", ["asset"])
SETTLED = Counter("earn_dual_subscriptions_settled_total", "Subscriptions settled, by outcome: converted, not_converted.", ["outcome"])
PLAN_FAILURES = Counter("earn_dual_settlement_failures_total", "Plan settlement attempts that failed, by reason: prices, wallet.", ["reason"])


def amount(counter: Counter, value: Decimal, *labels: str) -> None:
    if value > 0:
        counter.labels(*labels).inc(float(value))
