"""The accrual engine stops charging a fixed-term loan at its due time, like the loan
service (services/loan/domain.py ``charge_until``): no hour starting after the due time
enters the engine's debt, even while the loan's settlement is pending, so its LTV (and
its margin calls) agree with the service's.

- a property: for random fixed-term loans (and open-ended ones), random hour sequences
  running past the due time and repayments in between (a new loan state each), the
  engine's charged interest equals the service's ``charge_until`` at every hour;
- the agent: ``LoanStateChanged.due_at`` reaches the monitor and its table record, a
  restart keeps it, and a record written before it (no due time) is open-ended;
- an overdue loan whose post-due interest would cross the margin-call level is not
  called.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

from hypothesis import given, settings, strategies as st

from earn.v1 import accrual_pb2, loan_pb2
from services.accrual.loan import LtvMonitor
from services.accrual.loan_agent import LoanEngine
from services.kernel import events
from services.loan import domain
from services.loan.domain import HOUR_US, Collateral, Levels, Loan
from services.market import domain as market_domain
from services.market.simulator import tick_envelope
from tests.unit.test_loan_agent_state import Output, run  # the agent's output sink and input loop

BORROWED_HOUR = 540_000  # unix hours (2031)
START = datetime.fromtimestamp(BORROWED_HOUR * 3600, UTC)
BTC = market_domain.parse_pair("BTC/USDT")


def fresh(principal: int, rate: Fraction, borrowed_us: int) -> Loan:
    start = domain.start_hour(borrowed_us)
    return Loan("USDT", 6, principal, 0, rate, start, start - 1, collateral=[Collateral("BTC", 8, 10**8, Fraction(95, 100))])


def same_charges(engine: Loan, service: Loan) -> None:
    assert (engine.principal, engine.interest, engine.charged_through) == (service.principal, service.interest, service.charged_through)
    assert engine.exact_interest - engine.charged_units == service.exact_interest - service.charged_units


step_st = st.one_of(
    st.tuples(st.just("hours"), st.integers(1, 30 * 24 + 10)),  # the next hour tick, this many hours later
    st.tuples(st.just("repay"), st.integers(1, 1000)),  # a repayment of this share (per mille) of the debt, inside the current hour
)


@settings(max_examples=150, deadline=None)
@given(
    principal=st.integers(1, 10**12),
    rate_e10=st.integers(1, 10**7),  # hourly rate, 10 fraction digits (up to 0.1%)
    borrowed_offset_us=st.integers(0, 5 * HOUR_US),
    term=st.one_of(st.none(), st.sampled_from(domain.FIXED_TERMS_DAYS), st.integers(0, 72)),  # days, or hours for short ones
    steps=st.lists(step_st, min_size=1, max_size=12),
    within_us=st.integers(0, HOUR_US - 1),
)
def test_engine_charges_a_fixed_term_loan_like_the_service_at_every_hour(principal: int, rate_e10: int, borrowed_offset_us: int,
                                                                          term: int | None, steps: list[tuple[str, int]],
                                                                          within_us: int) -> None:
    borrowed_us = BORROWED_HOUR * HOUR_US + borrowed_offset_us
    if term is None:
        due_us = None
    elif term in domain.FIXED_TERMS_DAYS:
        due_us = borrowed_us + term * 86_400_000_000
    else:
        due_us = borrowed_us + term * HOUR_US + within_us  # a short term, so the sequence runs past it
    service = fresh(principal, Fraction(rate_e10, 10**10), borrowed_us)
    monitor = LtvMonitor()
    version = 1
    monitor.upsert("L", "u", version, service.copy(), Levels(), due_us=due_us)
    hour = domain.hour_of(borrowed_us)
    for kind, n in steps:
        now_us = hour * HOUR_US + within_us
        if kind == "hours":
            hour += n
            now_us = hour * HOUR_US + within_us
            monitor.hour_started(hour)
        else:  # the service: charge by the rule, repay, send the new state
            domain.charge_until(service, max(now_us, borrowed_us), due_us)
            amount = max(1, service.debt * n // 1000)
            paid = domain.repay(service, min(amount, service.debt))
            version += 1
            monitor.upsert("L", "u", version, service.copy(), Levels(), open_=not paid.closed, due_us=due_us)
            if paid.closed:
                assert "L" not in monitor.loans
                return
        expected = service.copy()
        domain.charge_until(expected, max(now_us, borrowed_us), due_us)
        same_charges(monitor.loans["L"].money, expected)
        if due_us is not None and now_us >= due_us:  # overdue: what the settlement at maturity charges
            at_maturity = service.copy()
            domain.charge_hours(at_maturity, domain.hour_of(due_us))
            same_charges(monitor.loans["L"].money, at_maturity)


def test_an_overdue_loan_is_not_margin_called_for_interest_after_its_due_time() -> None:
    borrowed_us = BORROWED_HOUR * HOUR_US + 10 * 60_000_000
    due_us = borrowed_us + 7 * 86_400_000_000
    due_hour = domain.hour_of(due_us)
    loan = fresh(30_000 * 10**6, Fraction(6, 10**6), borrowed_us)  # 0.18 USDT an hour
    monitor = LtvMonitor()
    # 168 hours by the due time: debt 30,030.24; called at BTC <= 30,030.24 / 0.76 = 39,513.47...; one hour more: 39,513.71...
    monitor.price("BTC", Fraction("39513.6"), 0)
    assert monitor.upsert("F", "u", 1, loan, Levels(), due_us=due_us) == []
    assert monitor.hour_started(due_hour) == []
    assert monitor.loans["F"].money.debt == 30_030_240_000
    for hour in (due_hour + 1, due_hour + 2, due_hour + 24 * 30):
        assert monitor.hour_started(hour) == []
        assert monitor.loans["F"].money.debt == 30_030_240_000 and monitor.loans["F"].money.charged_through == due_hour
    # the same loan open-ended is called by the next hour's interest
    open_ended = LtvMonitor()
    open_ended.price("BTC", Fraction("39513.6"), 0)
    open_ended.upsert("F", "u", 1, fresh(30_000 * 10**6, Fraction(6, 10**6), borrowed_us), Levels())
    assert open_ended.hour_started(due_hour) == []
    assert [a.kind.value for a in open_ended.hour_started(due_hour + 1)] == ["margin_call"]


# ---- the agent: the due time from the loan state to the table and back ------------------------------


def state(loan_id: str, due_us: int | None) -> bytes:
    """30,000 USDT at 0.000006 an hour against 1 BTC counted 95%, borrowed in BORROWED_HOUR."""
    msg = loan_pb2.LoanStateChanged(
        loan_id=loan_id, user_id=f"u-{loan_id}", version=1, status=loan_pb2.LOAN_STATUS_OPEN, loan_asset="USDT",
        principal_units=str(30_000 * 10**6), interest_units="0", interest_carry_e10=0, hourly_rate="0.000006",
        start_hour=BORROWED_HOUR + 1, charged_through=BORROWED_HOUR, margin_call_ltv="0.8", liquidation_ltv="0.9", rearm_band="0.01",
        initial_ltv="0.7", liquidation_fee="0.02", collateral=[loan_pb2.LoanCollateral(asset="BTC", amount="100000000", discount="0.95")],
    )
    if due_us is not None:
        msg.due_at.FromMicroseconds(due_us)
    return events.wrap(msg, key=loan_id, producer="test", occurred_at=START).SerializeToString()


def hour_closed(hour: int) -> bytes:
    return events.wrap(accrual_pb2.HourClosed(hour=hour), key=f"hour:{hour}", producer="test", occurred_at=START).SerializeToString()


def tick(price: str, seconds: int) -> bytes:
    return tick_envelope(BTC, Decimal(price), START + timedelta(seconds=seconds), "test")


def test_the_agent_keeps_the_due_time_across_a_restart_and_reads_older_records_as_open_ended() -> None:
    due_us = BORROWED_HOUR * HOUR_US + 10 * 60_000_000 + 7 * 86_400_000_000
    due_hour = domain.hour_of(due_us)
    table: dict[str, Any] = {}
    engine = LoanEngine(None, Output(), 6)
    engine.table = table
    run(engine, [tick("39513.6", 0), state("F", due_us), state("O", None), hour_closed(due_hour)])
    assert json.loads(table["l:0:F"])["d"] == due_us and "d" not in json.loads(table["l:0:O"])
    assert engine.monitor(0).loans["F"].money.debt == engine.monitor(0).loans["O"].money.debt == 30_030_240_000
    # a record written before the due time was kept: open-ended, as that engine charged it
    table["l:0:X"] = json.dumps({k: v for k, v in json.loads(table["l:0:F"]).items() if k != "d"})

    restarted = LoanEngine(None, Output(), 6)
    restarted.table = table
    loans = restarted.monitor(0).loans
    assert (loans["F"].due_us, loans["O"].due_us, loans["X"].due_us) == (due_us, None, None)
    run(restarted, [hour_closed(due_hour + 24)], first_offset=4)
    assert loans["F"].money.debt == 30_030_240_000 and loans["F"].money.charged_through == due_hour
    assert loans["O"].money.debt == loans["X"].money.debt == 30_034_560_000  # 24 hours more of 0.18
    assert sorted(a.loan_id for a in restarted.output.actions) == ["O", "X"]  # 30,034.56 / 37,537.92 >= 80%: only those called
    assert json.loads(table["l:0:F"])["d"] == due_us
