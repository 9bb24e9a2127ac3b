"""HODLer Airdrop's pure rules: the three-sum integral against a step-function reference
for random histories applied in random order, the split (never over the total, dust
under one unit per recipient, minimum and cap honoured), counted holdings (funding and
Simple Earn holds count, other holders never), request validation."""

from __future__ import annotations

import random
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from services.hodler import domain
from services.hodler.domain import Leg, Sums
from services.kernel.errors import InvalidArgument

H = domain.HOUR_US


def reference_integral(history: list[tuple[int, Fraction]], start: int, end: int) -> Fraction:
    """The balance as a step function (0 before the first change), integrated over [start,
    end) piece by piece, walking the changes in time order."""
    points = sorted(history, key=lambda x: x[0])
    balance = Fraction(0)
    total = Fraction(0)
    cursor = start
    for t, delta in points:
        if t >= end:
            break
        if t > cursor:
            total += balance * (t - cursor)
            cursor = t
        balance += delta
    total += balance * (end - cursor)
    return total


history_st = st.lists(
    st.tuples(st.integers(min_value=0, max_value=10 * H), st.integers(min_value=-10**9, max_value=10**9).map(lambda n: Fraction(n, 10**8))),
    max_size=40,
)


@given(history=history_st, start_h=st.integers(1, 5), length=st.integers(1, 4), seed=st.integers(0, 2**32))
@settings(max_examples=300, deadline=None)
def test_integral_equals_the_step_function_reference_in_any_arrival_order(history, start_h, length, seed) -> None:  # type: ignore[no-untyped-def]
    start, end = start_h * H, (start_h + length) * H
    arrival = list(history)
    random.Random(seed).shuffle(arrival)
    sums = Sums()
    for t, delta in arrival:
        sums = sums + domain.contribution(delta, t, start, end)
    assert domain.integral(sums, start, end) == reference_integral(history, start, end)
    assert domain.average(sums, start, end) == reference_integral(history, start, end) / (end - start)


@given(history=history_st, start_h=st.integers(1, 5), length=st.integers(1, 4), seed=st.integers(0, 2**32))
@settings(max_examples=200, deadline=None)
def test_hourly_averages_equal_the_reference_per_hour_and_average_to_the_window(history, start_h, length, seed) -> None:  # type: ignore[no-untyped-def]
    start, end = start_h * H, (start_h + length) * H
    pre = sum((d for t, d in history if t < start), Fraction(0))
    inside = [(t, d) for t, d in history if start <= t < end]
    random.Random(seed).shuffle(inside)
    hours = domain.hourly_averages(pre, inside, start_h, start_h + length)
    assert [h for h, _ in hours] == list(range(start_h, start_h + length))
    for hour, avg in hours:
        assert avg == reference_integral(history, hour * H, (hour + 1) * H) / H
    assert sum(avg for _, avg in hours) / length == reference_integral(history, start, end) / (end - start)


def test_integral_by_hand() -> None:
    # 10 held from before the start, +5 at the half of a 2-hour window, -15 after the end.
    s, e = 10 * H, 12 * H
    sums = Sums()
    for t, d in ((3 * H, Fraction(10)), (11 * H, Fraction(5)), (13 * H, Fraction(-15))):
        sums = sums + domain.contribution(d, t, s, e)
    assert domain.average(sums, s, e) == Fraction(10 * 2 + 5 * 1, 2)


weights_st = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3),
    st.integers(min_value=0, max_value=10**12).map(lambda n: Fraction(n, 10**4)),
    max_size=30,
)


@given(
    averages=weights_st, total=st.integers(1, 10**14).map(lambda n: Decimal(n).scaleb(-6)), scale=st.sampled_from([0, 2, 6, 8, 18]),
    minimum=st.integers(0, 10**6).map(lambda n: Decimal(n).scaleb(-4)), cap=st.one_of(st.none(), st.integers(1, 10**8).map(lambda n: Decimal(n).scaleb(-2))),
)
@settings(max_examples=300, deadline=None)
def test_split_never_over_total_dust_under_a_unit_min_and_cap_honoured(averages, total, scale, minimum, cap) -> None:  # type: ignore[no-untyped-def]
    counted = {u: domain.counted_average(a, minimum, cap) for u, a in averages.items()}
    for u, a in averages.items():
        if a < Fraction(minimum) or a == 0:
            assert counted[u] == 0
        else:
            assert counted[u] == (min(a, Fraction(cap)) if cap is not None else a)
    rewards = domain.split(counted, total, scale)
    assert set(rewards) == {u for u, c in counted.items() if c > 0}
    paid = sum(rewards.values(), Decimal(0))
    assert paid <= total
    unit = Fraction(1, 10**scale)
    whole = sum(counted.values(), Fraction(0))
    for u, r in rewards.items():
        exact = counted[u] * Fraction(total) / whole
        assert Fraction(r) <= exact < Fraction(r) + unit
        assert r.as_tuple().exponent >= -scale  # type: ignore[operator]
    if rewards:
        assert (Fraction(total) - Fraction(paid)) < unit * len(rewards)
    # Equal counted averages get equal rewards; a capped user never gets more than an uncapped larger one would.
    if cap is not None:
        top = max((r for u, r in rewards.items() if counted[u] == Fraction(cap)), default=None)
        if top is not None:
            assert all(r <= top for r in rewards.values())


def test_split_with_nobody_counted_pays_nothing() -> None:
    assert domain.split({"a": Fraction(0)}, Decimal("10"), 6) == {}


def test_counted_changes_funding_and_simple_earn_holds_only() -> None:
    place_se = [Leg("u", "GT", "funding", Decimal(-3)), Leg("u", "GT", "hold", Decimal(3))]
    assert domain.counted_changes(place_se, "simple_earn") == {}
    assert domain.counted_changes(place_se, "loan") == {("u", "GT"): Decimal(-3)}
    release_loan = [Leg("u", "GT", "hold", Decimal(-3)), Leg("u", "GT", "funding", Decimal(3))]
    assert domain.counted_changes(release_loan, "loan") == {("u", "GT"): Decimal(3)}
    capture_se = [Leg("u", "GT", "hold", Decimal(-2)), Leg("simple_earn", "GT", "treasury", Decimal(2))]
    assert domain.counted_changes(capture_se, "simple_earn") == {("u", "GT"): Decimal(-2)}
    transfer = [Leg("u", "GT", "funding", Decimal(-1)), Leg("v", "GT", "funding", Decimal(1)), Leg("x", "GT", "expense", Decimal(5))]
    assert domain.counted_changes(transfer, "") == {("u", "GT"): Decimal(-1), ("v", "GT"): Decimal(1)}


def test_status() -> None:
    assert domain.status(10, 20, 5, None) is domain.Status.UPCOMING
    assert domain.status(10, 20, 10, None) is domain.Status.ACTIVE
    assert domain.status(10, 20, 20, None) is domain.Status.ENDED
    assert domain.status(10, 20, 20, "distributing") is domain.Status.ENDED
    assert domain.status(10, 20, 5, "distributed") is domain.Status.DISTRIBUTED




def _request(**over: object) -> dict:
    base: dict = dict(airdrop_id="a1", hold_asset="GT", reward_asset="USDT", total="100", start_hour=10, end_hour=12,
                      min_average="", cap="", now_us=9 * H)
    base.update(over)
    return base


def test_parse_airdrop_defaults_and_errors() -> None:
    a = domain.parse_airdrop(**_request())
    assert a.min_average == Decimal(1) and a.cap is None and a.start_us == 10 * H
    bad = {
        "airdrop_id": ("", "airdrop_id: is required"), "hold_asset": ("NOPE", "hold_asset: unknown asset"),
        "reward_asset": ("", "reward_asset: is required"), "total": ("0", "total"), "end_hour": (10, "end_hour: must be after start_hour"),
        "start_hour": (9, "start_hour: must be in the future"), "min_average": ("-1", "min_average"), "cap": ("0.5", "per_user_cap"),
    }
    for field, (value, message) in bad.items():
        with pytest.raises(InvalidArgument) as err:
            domain.parse_airdrop(**_request(**{field: value}))
        assert message in str(err.value.message if hasattr(err.value, "message") else err.value), (field, err.value)
    with pytest.raises(InvalidArgument, match="at most"):
        domain.parse_airdrop(**_request(end_hour=10 + domain.MAX_AIRDROP_HOURS + 1))
