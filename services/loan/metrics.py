"""Crypto Loan metrics (the service's side; the engine's LTV bands are in
services/accrual/loan_agent.py). Labels are assets and kinds, never users or loans."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

BORROWED = Counter("earn_loan_borrowed_total", "Amount lent, in units of the loan asset.", ["asset"])
REPAID = Counter("earn_loan_repaid_total", "Amount repaid (interest and principal), in units of the loan asset.", ["asset"])
ACTIONS = Counter("earn_loan_actions_total", "Actions recorded: margin_call, rearmed, liquidation (executed; from the engine), maturity (a fixed term settled at its due time).", ["kind"])
LATENCY = Histogram(
    "earn_loan_price_to_action_seconds", "From the price tick's event time to the action recorded by the loan service.", ["kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DEAD_LETTERS = Counter(
    "earn_loan_dead_letters_total",
    "Records of loan.actions that could not be read, parked in dead_letters (the engine's margin calls or liquidations in them were not applied).",
)
