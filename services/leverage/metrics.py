"""Smart Leverage metrics. Labels are assets, directions, kinds and outcomes, never users or positions."""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import Counter, Gauge

EXPOSURE = Gauge(
    "earn_leverage_exposure",
    "The platform's open notional (principal x leverage, in the quote asset) per underlying and direction; kept from the store.",
    ["underlying", "direction"],
)
QUOTES = Counter("earn_leverage_quotes_total", "Quotes given.", ["underlying", "direction"])
SUBSCRIBED = Counter("earn_leverage_subscribed_total", "Principal subscribed, in units of the quote asset.", ["asset", "direction"])
PAID = Counter("earn_leverage_paid_total", "Amount paid at settlement or early redemption, in units of the asset.", ["asset"])
SETTLED = Counter(
    "earn_leverage_positions_settled_total", "Positions settled, by kind (maturity, early) and outcome (paid, zero, capped).", ["kind", "outcome"]
)
FAILURES = Counter("earn_leverage_settlement_failures_total", "Settlement attempts that failed, by reason: prices, wallet.", ["reason"])


def amount(counter: Counter, value: Decimal, *labels: str) -> None:
    if value > 0:
        counter.labels(*labels).inc(float(value))
