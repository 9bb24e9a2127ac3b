"""Smart Leverage formulas (PRODUCT_RULES.md) against an integer-only reference: both
directions in and out of the money, leverage up to the maximum, the floor at zero, the
breakeven rounding, the 5% entry band, the treasury cap."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from services.kernel.errors import FailedPrecondition, InvalidArgument
from services.leverage import domain
from services.leverage.domain import Direction, Product

HOUR_US = 3600 * 10**6
NOW = 1_900_000_000 * 10**6


def product(max_leverage: str = "20", fee: str = "0.005") -> Product:
    return Product("p", "BTC", "USDT", Decimal(max_leverage), Decimal(fee), Decimal(10), Decimal(100000), 720, 1800)


def ref_payoff_units(long: bool, i_units: int, lev_cents: int, b_units: int, s_units: int, scale: int = 6) -> int:
    """Units (10^-scale) of max(0, I + I L (S-B)/B) long, max(0, I + I L (B-S)/B) short, floored.
    i: 10^-scale, lev: 10^-2, b and s: price units (the same scale on both sides)."""
    move = (s_units - b_units) if long else (b_units - s_units)
    # I + I L move / B = I (100 B + lev move) / (100 B)
    num = i_units * (100 * b_units + lev_cents * move)
    den = 100 * b_units
    return max(0, num // den)


def ref_breakeven_units(long: bool, p_units: int, fee_micros: int) -> int:
    num = p_units * (10**6 + fee_micros) if long else p_units * (10**6 - fee_micros)
    return -((-num) // 10**6) if long else num // 10**6


def units(value: Decimal, scale: int = 6) -> int:
    scaled = value.scaleb(scale)
    assert scaled == scaled.to_integral_value(), value
    return int(scaled)


prices = st.integers(min_value=1, max_value=10**12)  # up to 1,000,000 USDT at scale 6
principals = st.integers(min_value=1, max_value=10**12)
leverages = st.integers(min_value=100, max_value=10000)  # 1.00 to 100.00


@settings(max_examples=400)
@given(long=st.booleans(), i=principals, lev=leverages, b=prices, s=prices)
def test_payoff_matches_the_integer_reference(long: bool, i: int, lev: int, b: int, s: int) -> None:
    d = Direction.LONG if long else Direction.SHORT
    got = domain.payoff(d, Decimal(i).scaleb(-6), Decimal(lev).scaleb(-2), Decimal(b).scaleb(-6), Decimal(s).scaleb(-6), 6)
    assert units(got) == ref_payoff_units(long, i, lev, b, s)
    assert got >= 0


@settings(max_examples=300)
@given(long=st.booleans(), i=principals, lev=leverages, b=prices)
def test_at_breakeven_the_principal_comes_back_and_the_direction_matters(long: bool, i: int, lev: int, b: int) -> None:
    d = Direction.LONG if long else Direction.SHORT
    I, L, B = Decimal(i).scaleb(-6), Decimal(lev).scaleb(-2), Decimal(b).scaleb(-6)
    assert domain.payoff(d, I, L, B, B, 6) == I
    up, down = B + Decimal("0.000001"), max(B - Decimal("0.000001"), Decimal("0.000001"))
    winner, loser = (up, down) if long else (down, up)
    assert domain.payoff(d, I, L, B, winner, 6) >= I
    if loser != B:
        assert domain.payoff(d, I, L, B, loser, 6) <= I


@settings(max_examples=300)
@given(long=st.booleans(), i=principals, lev=leverages, b=prices, s=prices)
def test_the_most_a_user_can_lose_is_the_principal_and_a_short_gains_at_most_l_times(long: bool, i: int, lev: int, b: int, s: int) -> None:
    d = Direction.LONG if long else Direction.SHORT
    I, L, B, S = Decimal(i).scaleb(-6), Decimal(lev).scaleb(-2), Decimal(b).scaleb(-6), Decimal(s).scaleb(-6)
    got = domain.payoff(d, I, L, B, S, 6)
    assert got >= 0
    if not long:
        assert got <= I * (1 + L)


def test_floored_at_zero_far_out_of_the_money() -> None:
    I, L = Decimal(1000), Decimal(20)
    assert domain.payoff(Direction.LONG, I, L, Decimal(60000), Decimal(50000), 6) == 0
    assert domain.payoff(Direction.SHORT, I, L, Decimal(60000), Decimal(70000), 6) == 0
    # just inside: 5% against at 20x leaves exactly nothing, 4% against leaves a fifth
    assert domain.payoff(Direction.LONG, I, L, Decimal(60000), Decimal(57000), 6) == 0
    assert domain.payoff(Direction.LONG, I, L, Decimal(60000), Decimal(57600), 6) == Decimal(200)


@settings(max_examples=300)
@given(long=st.booleans(), p=prices, fee=st.integers(min_value=0, max_value=50000))
def test_breakeven_matches_the_reference_and_lies_on_the_right_side(long: bool, p: int, fee: int) -> None:
    d = Direction.LONG if long else Direction.SHORT
    got = domain.breakeven(d, Decimal(p).scaleb(-6), Decimal(fee).scaleb(-6), 6)
    assert units(got) == ref_breakeven_units(long, p, fee)
    if fee:
        assert (got >= Decimal(p).scaleb(-6)) if long else (got <= Decimal(p).scaleb(-6))


@given(p=prices, index=prices)
def test_entry_band_is_five_percent_of_the_index(p: int, index: int) -> None:
    assert domain.within_entry_band(Decimal(p), Decimal(index)) == (abs(p - index) * 100 <= 5 * index)


@given(amount=st.integers(min_value=0, max_value=10**12), balance=st.integers(min_value=-(10**6), max_value=10**12))
def test_payout_is_capped_by_the_treasury_and_never_negative(amount: int, balance: int) -> None:
    got = domain.capped(Decimal(amount), Decimal(balance))
    assert got == max(0, min(amount, balance))


def test_product_and_request_rules() -> None:
    p = product()
    domain.check_leverage(p, Decimal(20))
    domain.check_leverage(p, Decimal(1))
    with pytest.raises(InvalidArgument, match="^leverage: at most"):
        domain.check_leverage(p, Decimal("20.01"))
    with pytest.raises(InvalidArgument, match="^leverage: must be at least 1"):
        domain.check_leverage(p, Decimal("0.99"))
    with pytest.raises(FailedPrecondition, match="minimum"):
        domain.check_principal(p, Decimal("9.99"))
    with pytest.raises(FailedPrecondition, match="maximum"):
        domain.check_principal(p, Decimal("100000.01"))
    maturity = (NOW // HOUR_US + 2) * HOUR_US
    domain.check_maturity(p, maturity, NOW)
    with pytest.raises(InvalidArgument, match="full UTC hour"):
        domain.check_maturity(p, maturity + 60 * 10**6, NOW)
    with pytest.raises(InvalidArgument, match="settlement window"):
        domain.check_maturity(p, maturity, maturity - 1800 * 10**6)
    with pytest.raises(InvalidArgument, match="at most 720 hours"):
        domain.check_maturity(p, maturity + 720 * HOUR_US, NOW)
    with pytest.raises(InvalidArgument, match="^max_leverage"):
        domain.check_product(Decimal("100.01"), Decimal(0), Decimal(1), Decimal(2))
    with pytest.raises(InvalidArgument, match="^fee_rate"):
        domain.check_product(Decimal(10), Decimal("0.050001"), Decimal(1), Decimal(2))
    with pytest.raises(InvalidArgument, match="^max_principal"):
        domain.check_product(Decimal(10), Decimal(0), Decimal(2), Decimal(1))
    assert len(domain.treasury_owner("x" * 64)) == 64
