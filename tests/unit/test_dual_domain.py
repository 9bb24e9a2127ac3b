"""Dual Investment formulas (PRODUCT_RULES.md) against an integer-only reference: both
directions, in and out of the money, the strike exactly hit, truncation to the payout
asset's scale."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from services.dual import domain
from services.dual.domain import Direction, Plan
from services.kernel.errors import FailedPrecondition, InvalidArgument

DAY_US = 86_400 * 10**6
SETTLE = 1_900_000_800 * 10**6 // 3600 * 3600  # a full hour


def plan(direction: Direction, strike: str, apr: str, base: str = "BTC", quote: str = "USDT") -> Plan:
    return Plan("p", base, quote, direction, Decimal(strike), Decimal(apr), SETTLE, 1800, Decimal("0.001"), Decimal(100), Decimal(1000))


def reference(direction: str, p: int, p_scale: int, k: int, apr_units: int, dt_us: int, s: int, base_scale: int, quote_scale: int) -> tuple[bool, bool, int]:
    """(converted, paid in base, units of the payout asset) with integers only.
    p: principal units (10^-p_scale), k and s: price units (10^-quote_scale), apr: 10^-6."""
    year = 365 * DAY_US * 10**6  # denominator of (1 + y) = (year + apr_units * dt_us) / year
    grow = year + apr_units * dt_us
    if direction == "sell_high":
        if s >= k:  # P x K x (1 + y) in quote
            num, den = p * k * grow * 10**quote_scale, 10**p_scale * 10**quote_scale * year
            return True, False, num // den
        num, den = p * grow * 10**base_scale, 10**p_scale * year
        return False, True, num // den
    if s <= k:  # P / K x (1 + y) in base
        num, den = p * 10**quote_scale * grow * 10**base_scale, 10**p_scale * k * year
        return True, True, num // den
    num, den = p * grow * 10**quote_scale, 10**p_scale * year
    return False, False, num // den


@settings(max_examples=500, deadline=None)
@given(
    direction=st.sampled_from(["sell_high", "buy_low"]),
    p=st.integers(1, 10**14), k=st.integers(1, 10**12), s_delta=st.integers(-10**6, 10**6),
    apr=st.integers(0, 5 * 10**6), dt=st.integers(0, 400 * DAY_US),
)
def test_settlement_matches_the_integer_reference(direction: str, p: int, k: int, s_delta: int, apr: int, dt: int) -> None:
    s = max(1, k + s_delta)
    d = Direction(direction)
    p_scale = 8 if d is Direction.SELL_HIGH else 6
    pl = plan(d, str(Decimal(k).scaleb(-6)), str(Decimal(apr).scaleb(-6)))
    got = domain.settle(pl, Decimal(p).scaleb(-p_scale), SETTLE - dt, Decimal(s).scaleb(-6))
    converted, in_base, units = reference(direction, p, p_scale, k, apr, dt, s, 8, 6)
    assert got.converted == converted
    assert got.asset == ("BTC" if in_base else "USDT")
    assert got.amount == Decimal(units).scaleb(-(8 if in_base else 6))
    assert Fraction(got.amount) <= got.exact < Fraction(got.amount) + Fraction(1, 10 ** (8 if in_base else 6))


def test_worked_examples() -> None:
    # 1 BTC sell-high at K 60,000, APR 36.5%, 10 days: y = 0.01.
    sell = plan(Direction.SELL_HIGH, "60000", "0.365")
    assert domain.settle(sell, Decimal(1), SETTLE - 10 * DAY_US, Decimal("60000")).amount == Decimal("60600")  # strike hit: converts
    assert domain.settle(sell, Decimal(1), SETTLE - 10 * DAY_US, Decimal("59999.999999")).amount == Decimal("1.01")
    buy = plan(Direction.BUY_LOW, "60000", "0.365")
    hit = domain.settle(buy, Decimal(6000), SETTLE - 10 * DAY_US, Decimal("60000"))  # strike hit: converts
    assert (hit.converted, hit.asset, hit.amount) == (True, "BTC", Decimal("0.101"))
    out = domain.settle(buy, Decimal(6000), SETTLE - 10 * DAY_US, Decimal("60000.000001"))
    assert (out.converted, out.asset, out.amount) == (False, "USDT", Decimal("6060"))
    # Truncated, never rounded up: 1/3 of a unit.
    third = domain.settle(plan(Direction.BUY_LOW, "3", "0"), Decimal("0.000001"), SETTLE, Decimal(1))
    assert third.amount == Decimal("0.00000033")


def test_subscription_preconditions() -> None:
    pl = plan(Direction.SELL_HIGH, "60000", "0.1")
    now = SETTLE - DAY_US
    domain.check_subscription(pl, Decimal("1"), Decimal(0), Decimal(0), now)
    for args, fragment in [
        ((Decimal("0.0001"), Decimal(0), Decimal(0), now), "minimum"),
        ((Decimal("2"), Decimal("99"), Decimal(0), now), "per-user maximum"),
        ((Decimal("2"), Decimal(0), Decimal("999"), now), "quota"),
        ((Decimal("1"), Decimal(0), Decimal(0), SETTLE - 1800 * 10**6), "closed for subscriptions"),
    ]:
        with pytest.raises(FailedPrecondition, match=fragment):
            domain.check_subscription(pl, *args)


def test_settlement_time_rules() -> None:
    now = SETTLE - DAY_US
    domain.check_settlement(SETTLE, 1800, now)
    with pytest.raises(InvalidArgument, match="^settlement_time: must be a full UTC hour"):
        domain.check_settlement(SETTLE + 1, 1800, now)
    with pytest.raises(InvalidArgument, match="^settlement_time: must be after now"):
        domain.check_settlement(SETTLE, 1800, SETTLE - 1800 * 10**6)
    with pytest.raises(InvalidArgument, match="^settlement_time: must be at most"):
        domain.check_settlement(SETTLE, 1800, SETTLE - 400 * DAY_US)
