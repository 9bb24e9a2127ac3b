"""Simple Earn's business metrics (Prometheus, served on the process's /metrics).

Names are prefixed ``earn_``; labels are products, assets and outcomes, never users.
Amounts are exact decimals everywhere else; a metric sample is a float, which is fine for
dashboards and alerts and is never read back into any amount.

Counters move only after the transaction that records the fact committed, and only the
first time (an idempotent replay moves nothing), so each one tracks its table:
subscriptions (every source), redemptions (user and maturity), interest (payouts and
maturity interest).
"""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import Counter, Gauge, Histogram

SUBSCRIBED = Counter(
    "earn_simple_earn_subscribed_total",
    "Amount subscribed (user subscriptions, auto-subscribe reinvestments, auto-renewals), in units of the asset.",
    ["product", "asset"],
)
REDEEMED = Counter(
    "earn_simple_earn_redeemed_total",
    "Principal redeemed (user redemptions and maturities), in units of the asset.",
    ["product", "asset"],
)
INTEREST_PAID = Counter(
    "earn_simple_earn_interest_paid_total",
    "Interest paid (flexible payouts and fixed-term interest at maturity), in units of the asset.",
    ["product", "asset"],
)
POSITIONS_OPEN = Gauge("earn_simple_earn_positions_open", "Open (active) positions.", ["product"])
PAYOUT_BATCHES = Counter(
    "earn_simple_earn_payout_batches_total",
    "PayoutBatch records consumed, by outcome: paid, duplicate, dead_letter.",
    ["outcome"],
)
PAYOUT_BATCH_SECONDS = Histogram(
    "earn_simple_earn_payout_batch_seconds",
    "Time to apply one PayoutBatch record (check, record, wallet credit, reinvestment, post), retries included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SUBSCRIBE_BATCH = Histogram(
    "earn_simple_earn_subscribe_batch_size",
    "Subscribes of one product recorded in one transaction (group commit): 1 when idle, more under load.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
REDEEM_BATCH = Histogram(
    "earn_simple_earn_redeem_batch_size",
    "Redeems of one product recorded in one transaction (group commit, a savepoint each): 1 when idle.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
DEAD_LETTERS = Counter(
    "earn_simple_earn_dead_letters_total",
    "Payout records parked in dead_letters, by reason: unreadable (not parsed or not applied),"
    " items_skipped (applied, but some items could not be paid).",
    ["reason"],
)


def amount(counter: Counter, product: str, asset: str, value: Decimal) -> None:
    """Add a positive amount to a per-product counter (a float only here)."""
    if value > 0:
        counter.labels(product, asset).inc(float(value))


def set_open_positions(rows: list[tuple[str, int]]) -> None:
    for product, count in rows:
        POSITIONS_OPEN.labels(product).set(count)
