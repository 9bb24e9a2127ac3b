"""Crypto Loan rules (PRODUCT_RULES.md) against integer-only references: hourly interest
into the debt (started hour full, floor with carry), repayment order, the LTV and its
levels (borrow, collateral removal), multi-collateral with different discounts, and the
liquidation split (sold, returned, surplus, shortfall)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from services.kernel.errors import FailedPrecondition
from services.loan import domain
from services.loan.domain import Collateral, Levels, Loan

RATE_DEN = 10**domain.RATE_SCALE


def make_loan(principal: int, rate_num: int, collateral: list[Collateral], scale: int = 6, asset: str = "USDT", start: int = 100) -> Loan:
    return Loan(asset, scale, principal, 0, Fraction(rate_num, RATE_DEN), start, start - 1, collateral=collateral)


# ---- interest ------------------------------------------------------------------------------


@settings(max_examples=300)
@given(
    principal=st.integers(1, 10**15),
    rate=st.integers(1, 10**7),
    steps=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 10**15)), min_size=1, max_size=8),
)
def test_interest_is_the_exact_total_floored(principal: int, rate: int, steps: list[tuple[int, int]]) -> None:
    """Hours charged at their start on the principal then; repayments in between; the
    interest charged is floor(sum of principal_h x rate) exactly, never more."""
    loan = make_loan(principal, rate, [])
    ref_sum = 0  # sum of principal_h x rate_num, exact
    ref_paid_interest = 0
    hour = loan.start_hour - 1
    for gap, pay in steps:
        target = hour + gap
        for h in range(hour + 1, target + 1):
            if h >= loan.start_hour:
                ref_sum += principal * rate
        hour = target
        domain.charge_hours(loan, hour)
        assert loan.charged_units == ref_sum // RATE_DEN
        assert loan.interest == ref_sum // RATE_DEN - ref_paid_interest
        amount = min(pay, loan.debt)
        if amount == 0:
            continue
        r = domain.repay(loan, amount)
        assert r.interest_paid == min(amount, loan.interest + r.interest_paid)
        ref_paid_interest += r.interest_paid
        principal -= r.principal_paid
        assert loan.principal == principal
        if r.closed:
            assert loan.debt == 0
            break


def test_a_started_hour_counts_as_full() -> None:
    borrowed = 500_000 * domain.HOUR_US + 20 * 60 * 10**6  # hh:20
    start = domain.start_hour(borrowed)
    assert start == 500_001
    loan = make_loan(1_000_000_000, 10**6, [], start=start)  # 1000 USDT at 0.0001 per hour
    domain.charge_hours(loan, domain.hour_of(borrowed))  # the borrowing's own hour: nothing
    assert loan.interest == 0
    domain.charge_hours(loan, domain.hour_of((500_001 * 3600 + 600) * 10**6))  # 10 minutes into the first hour: charged in full
    assert loan.interest == 100_000  # 0.1 USDT
    domain.charge_hours(loan, 500_001)  # again: nothing twice
    assert loan.interest == 100_000


@given(principal=st.integers(1, 10**12), interest=st.integers(0, 10**12), amount=st.integers(1, 3 * 10**12))
def test_repay_interest_first_then_principal(principal: int, interest: int, amount: int) -> None:
    loan = make_loan(principal, 0, [])
    loan.interest = interest
    if amount > principal + interest:
        with pytest.raises(FailedPrecondition):
            domain.repay(loan, amount)
        assert (loan.principal, loan.interest) == (principal, interest)
        return
    r = domain.repay(loan, amount)
    assert r.interest_paid == min(amount, interest)
    assert r.principal_paid == amount - r.interest_paid
    assert loan.interest + loan.principal + amount == principal + interest
    assert r.closed == (amount == principal + interest)


# ---- LTV and its levels ----------------------------------------------------------------------

ASSETS = [("BTC", 8), ("ETH", 18), ("SOL", 9)]
collateral_st = st.lists(
    st.tuples(st.sampled_from(range(3)), st.integers(1, 10**12), st.integers(1, 10**4)), min_size=1, max_size=3, unique_by=lambda t: t[0]
)
price_st = st.integers(1, 10**11)  # USDT at scale 6


def build(entries: list[tuple[int, int, int]]) -> list[Collateral]:
    return [Collateral(ASSETS[i][0], ASSETS[i][1], amount, Fraction(d, 10**4)) for i, amount, d in entries]


def ref_ltv_le(debt: int, level: Fraction, entries: list[tuple[int, int, int]], prices: dict[str, int]) -> bool:
    """debt (USDT units) / sum(amount x price x discount) <= level, in integers only.
    Values in 10^-(6 + asset scale + 4 + 6) USDT."""
    big = 6 + 18 + 4 + 6
    value = sum(amount * prices[ASSETS[i][0]] * d * 10 ** (big - (ASSETS[i][1] + 6 + 4)) for i, amount, d in entries)
    debt_scaled = debt * 10 ** (big - 6)
    return debt_scaled * level.denominator <= level.numerator * value


@settings(max_examples=300)
@given(entries=collateral_st, debt=st.integers(1, 10**14), p=st.lists(price_st, min_size=3, max_size=3))
def test_ltv_against_integer_reference(entries: list[tuple[int, int, int]], debt: int, p: list[int]) -> None:
    prices_units = {ASSETS[i][0]: p[i] for i in range(3)}
    prices = {a: Fraction(v, 10**6) for a, v in prices_units.items()}
    loan = make_loan(debt, 0, build(entries))
    value = domain.ltv(loan, prices)
    for level in (Fraction(70, 100), Fraction(80, 100), Fraction(90, 100)):
        assert (value <= level) == ref_ltv_le(debt, level, entries, prices_units)
    if ref_ltv_le(debt, Fraction(70, 100), entries, prices_units):
        domain.check_borrow(loan, prices, Levels())
    else:
        with pytest.raises(FailedPrecondition, match="initial LTV"):
            domain.check_borrow(loan, prices, Levels())


@settings(max_examples=300)
@given(entries=collateral_st, debt=st.integers(1, 10**14), p=st.lists(price_st, min_size=3, max_size=3), which=st.integers(0, 2),
       share=st.fractions(0, 1))
def test_collateral_removal_refused_exactly_when_it_breaches_the_initial_ltv(
    entries: list[tuple[int, int, int]], debt: int, p: list[int], which: int, share: Fraction
) -> None:
    prices_units = {ASSETS[i][0]: p[i] for i in range(3)}
    prices = {a: Fraction(v, 10**6) for a, v in prices_units.items()}
    idx, amount, _ = entries[which % len(entries)]
    take = max(1, int(amount * share))
    after = [(i, a - take if i == idx else a, d) for i, a, d in entries]
    loan = make_loan(debt, 0, build(entries))
    before = [c.amount for c in loan.collateral]
    if ref_ltv_le(debt, Fraction(70, 100), after, prices_units):
        domain.remove_collateral(loan, ASSETS[idx][0], take, prices, Levels())
        assert [c.amount for c in loan.collateral] == [a for _, a, _ in after]
    else:
        with pytest.raises(FailedPrecondition, match="initial LTV"):
            domain.remove_collateral(loan, ASSETS[idx][0], take, prices, Levels())
        assert [c.amount for c in loan.collateral] == before


def test_multi_collateral_with_different_discounts() -> None:
    """1 BTC at 60,000 counted 95% and 10 ETH at 3,000 counted 90%: 57,000 + 27,000 = 84,000."""
    coll = [Collateral("BTC", 8, 10**8, Fraction(95, 100)), Collateral("ETH", 18, 10 * 10**18, Fraction(90, 100))]
    loan = make_loan(58_800 * 10**6, 0, coll)
    prices = {"BTC": Fraction(60_000), "ETH": Fraction(3_000)}
    assert domain.ltv(loan, prices) == Fraction(58_800, 84_000) == Fraction(70, 100)
    domain.check_borrow(loan, prices, Levels())
    loan.principal += 1
    with pytest.raises(FailedPrecondition, match="70.00%"):
        domain.check_borrow(loan, prices, Levels())


# ---- liquidation ---------------------------------------------------------------------------


@settings(max_examples=300)
@given(entries=collateral_st, debt=st.integers(1, 10**14), p=st.lists(price_st, min_size=3, max_size=3), fee=st.integers(0, 500))
def test_liquidation_against_integer_reference(entries: list[tuple[int, int, int]], debt: int, p: list[int], fee: int) -> None:
    """Sell just enough in collateral order at price x (1 - fee): amounts rounded up per
    asset, surplus floored, shortfall exact; nothing created or lost."""
    prices_units = {ASSETS[i][0]: p[i] for i in range(3)}
    prices = {a: Fraction(v, 10**6) for a, v in prices_units.items()}
    fee_f = Fraction(fee, 10**4)
    loan = make_loan(debt, 0, build(entries))
    got = domain.liquidate(loan, prices, fee_f)
    # reference: proceeds in 10^-(6 + 18 + 6 + 4) USDT units (loan asset USDT at scale 6)
    big = 6 + 18 + 6 + 4
    need = debt * 10 ** (big - 6)
    total = 0
    for (i, amount, _), sale in zip(entries, got.sales):
        asset, scale = ASSETS[i]
        unit = prices_units[asset] * (10**4 - fee) * 10 ** (big - scale - 6 - 4)  # one collateral unit, in big units
        remaining = need - total
        sold = 0 if remaining <= 0 else min(amount, -(-remaining // unit))
        total += sold * unit
        assert (sale.sold, sale.returned) == (sold, amount - sold)
    if total >= need:
        assert (got.debt_repaid, got.surplus, got.shortfall) == (debt, (total - need) // 10 ** (big - 6), 0)
    else:
        assert (got.debt_repaid, got.surplus, got.shortfall) == (total // 10 ** (big - 6), 0, debt - total // 10 ** (big - 6))
    assert got.debt_repaid + got.shortfall == debt


def test_trigger_price_is_where_the_ltv_equals_the_level() -> None:
    coll = [Collateral("BTC", 8, 10**8, Fraction(95, 100)), Collateral("ETH", 18, 10 * 10**18, Fraction(90, 100))]
    loan = make_loan(58_800 * 10**6, 0, coll)
    eth_value = Fraction(10) * 3000 * Fraction(90, 100)
    p = domain.trigger_price(Fraction(58_800), Fraction(80, 100), eth_value, Fraction(1), Fraction(95, 100))
    assert p is not None
    assert domain.ltv(loan, {"BTC": p, "ETH": Fraction(3000)}) == Fraction(80, 100)
    assert domain.trigger_price(Fraction(1), Fraction(80, 100), eth_value, Fraction(1), Fraction(95, 100)) is None


# ---- fixed terms at their due time -----------------------------------------------------------


@settings(max_examples=300)
@given(principal=st.integers(10**6, 10**12), rate=st.integers(0, 10**6), days=st.sampled_from([7, 30]),
       offset_us=st.integers(0, domain.HOUR_US - 1), btc=st.integers(1, 10**8 * 3), price=st.integers(10**6, 10**11),
       late_hours=st.integers(0, 50))
def test_maturity_charges_the_hours_started_by_the_due_time_then_sells_without_a_fee(
    principal: int, rate: int, days: int, offset_us: int, btc: int, price: int, late_hours: int,
) -> None:
    """Borrowed in hour 100 (at offset_us into it; interest from hour 101): the hours started
    by the due time are charged, 24 x days of them (a started hour is full; nothing after
    the due time, however late the settlement or a repayment); then just enough BTC sold
    at the index itself (no fee), the surplus floored, the rest returned."""
    borrowed_us = 100 * domain.HOUR_US + offset_us
    due_us = borrowed_us + days * 24 * domain.HOUR_US
    loan = make_loan(principal, rate, [Collateral("BTC", 8, btc, Fraction(95, 100))], start=101)
    late = make_loan(principal, rate, [Collateral("BTC", 8, btc, Fraction(95, 100))], start=101)
    domain.charge_until(late, due_us + late_hours * domain.HOUR_US, due_us)  # a repayment after the due time: capped
    hours = 24 * days  # 101 .. 100 + 24 x days: the last one starts at or before the due time
    interest = principal * rate * hours // RATE_DEN
    assert late.interest == interest
    prices = {"BTC": Fraction(price, 10**6)}
    got = domain.settle_at_maturity(loan, prices, due_us)
    assert loan.interest == interest and loan.debt == principal + interest
    debt = principal + interest
    # price is in 10^-6 USDT per BTC: one satoshi is worth price / 10^8 USDT units (scale 6)
    wanted = -(-debt * 10**8 // price)
    sold = min(btc, wanted)
    assert (got.sales[0].sold, got.sales[0].returned) == (sold, btc - sold)
    proceeds = sold * price  # USDT units x 10^8
    if proceeds >= debt * 10**8:
        assert (got.debt_repaid, got.surplus, got.shortfall) == (debt, (proceeds - debt * 10**8) // 10**8, 0)
    else:
        assert (got.debt_repaid, got.surplus, got.shortfall) == (proceeds // 10**8, 0, debt - proceeds // 10**8)
