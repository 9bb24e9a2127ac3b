"""Market domain: the TWAP and the missing-data rule against a brute-force reference
(prices sampled second by second), for arbitrary tick series."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from services.kernel.errors import FailedPrecondition, InvalidArgument
from services.market import domain
from services.market.domain import Tick

US = domain.US
PAIR = domain.parse_pair("BTC/USDT")


def reference(ticks: list[tuple[int, int]], start: int, end: int, gap: int) -> tuple[Fraction, bool]:
    """(exact TWAP, complete) by brute force over whole seconds; ticks are (second, price units)."""
    total, complete = Fraction(0), True
    for s in range(start, end):
        in_force = [t for t in ticks if t[0] <= s]
        if not in_force:
            return Fraction(0), False
        at, units = max(in_force)
        if s + 1 - at > gap:
            complete = False
        total += Fraction(units, 10**6)
    return total / (end - start), complete


@st.composite
def series(draw):  # type: ignore[no-untyped-def]
    start = draw(st.integers(1_700_000_000, 1_700_000_100))
    length = draw(st.integers(1, 120))
    times = sorted(draw(st.sets(st.integers(start - 30, start + length - 1), min_size=0, max_size=40)))
    prices = [draw(st.integers(1, 10**12)) for _ in times]
    gap = draw(st.integers(1, 40))
    return start, start + length, list(zip(times, prices)), gap


@settings(max_examples=300, deadline=None)
@given(series())
def test_twap_and_gaps_match_the_reference(case) -> None:  # type: ignore[no-untyped-def]
    start, end, raw, gap = case
    before = [t for t in raw if t[0] <= start]
    used = ([max(before)] if before else []) + [t for t in raw if t[0] > start]
    ticks = [Tick(t * US, Decimal(p).scaleb(-6)) for t, p in used]
    exact, complete = reference(raw, start, end, gap)
    if not complete:
        with pytest.raises(FailedPrecondition) as err:
            domain.twap(PAIR, ticks, start * US, end * US, gap * US)
        assert "prices missing for BTC/USDT" in err.value.message
        return
    result = domain.twap(PAIR, ticks, start * US, end * US, gap * US)
    assert result.exact == exact
    assert result.price == domain.round_price(exact, 6)
    assert abs(Fraction(result.price) - exact) <= Fraction(1, 2 * 10**6)
    assert result.max_age_us <= gap * US


def test_round_price_is_half_even() -> None:
    assert domain.round_price(Fraction(5, 10**7), 6) == Decimal("0")
    assert domain.round_price(Fraction(15, 10**7), 6) == Decimal("0.000002")
    assert domain.round_price(Fraction(1, 3), 6) == Decimal("0.333333")
    assert domain.round_price(Fraction(2, 3), 6) == Decimal("0.666667")


def test_the_gap_message_names_both_ends() -> None:
    t0 = 1_800_000_000
    ticks = [Tick(t0 * US, Decimal("100")), Tick((t0 + 10) * US, Decimal("101")), Tick((t0 + 200) * US, Decimal("102"))]
    with pytest.raises(FailedPrecondition) as err:
        domain.twap(PAIR, ticks, t0 * US, (t0 + 300) * US, 60 * US)
    message = err.value.message
    assert domain.iso((t0 + 10) * US) in message and domain.iso((t0 + 200) * US) in message and "190 s > the maximum gap of 60 s" in message
    with pytest.raises(FailedPrecondition, match="no tick at or before the window start"):
        domain.twap(PAIR, ticks[1:], t0 * US, (t0 + 300) * US, 60 * US)
    with pytest.raises(FailedPrecondition, match="no tick between"):  # stale at the end
        domain.twap(PAIR, ticks, (t0 + 200) * US, (t0 + 300) * US, 60 * US)


def test_a_constant_price_is_its_own_twap() -> None:
    t0 = 1_800_000_000
    ticks = [Tick((t0 + i * 30) * US, Decimal("60000.5")) for i in range(61)]
    assert domain.twap(PAIR, ticks, (t0 + 30) * US, (t0 + 1830) * US, 60 * US).price == Decimal("60000.5")


@pytest.mark.parametrize("text", ["", "BTC", "btc/usdt", "BTC/BTC", "BTC/NOPE", "BTC-USDT", "BTC/USDT/ETH", " BTC/USDT"])
def test_bad_pairs(text: str) -> None:
    with pytest.raises(InvalidArgument, match="^pair: "):
        domain.parse_pair(text)


def test_window_rules() -> None:
    with pytest.raises(InvalidArgument, match="^end: must be after start"):
        domain.check_window(10, 10)
    with pytest.raises(InvalidArgument, match="^end: the window may be at most"):
        domain.check_window(0, domain.MAX_WINDOW_US + 1)


def test_simulator_walk_is_seeded_positive_and_quantized() -> None:
    from services.market.simulator import walk

    a = walk(seed=7, start=Decimal("60000"), drift=0.05, volatility=0.8, steps=500, step_seconds=1.0, scale=6)
    b = walk(seed=7, start=Decimal("60000"), drift=0.05, volatility=0.8, steps=500, step_seconds=1.0, scale=6)
    c = walk(seed=8, start=Decimal("60000"), drift=0.05, volatility=0.8, steps=500, step_seconds=1.0, scale=6)
    assert a == b and a != c and len(a) == 500
    assert all(p > 0 and p == p.quantize(Decimal("0.000001")) for p in a)
