"""Launchpool's service rules (pure): pools and tiers, personal caps, stake and unstake
preconditions, the payout calendar, the hourly reward and the estimated APR."""

from __future__ import annotations

from decimal import Decimal
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.kernel.errors import FailedPrecondition, InvalidArgument
from services.launchpool import domain
from services.launchpool.domain import CapTier, PayoutMode

H = 3600 * 10**6
units = st.integers(1, 10**12).map(lambda n: Decimal(n).scaleb(-6))


def spec(**fields):  # type: ignore[no-untyped-def]
    base = dict(pool_id="p1", stake_asset="USDT", total_reward="10", min_stake="1", max_stake="100", pool_cap="", newcomer_only=False, cap_tiers=[])
    return SimpleNamespace(**{**base, **fields})


def tier(volume: str, stake: str) -> SimpleNamespace:
    return SimpleNamespace(min_volume=volume, max_stake=stake)


@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 10**6)), max_size=6), st.integers(0, 2 * 10**9), st.integers(1, 10**6))
def test_the_personal_cap_is_the_highest_tier_reached(raw: list[tuple[int, int]], volume: int, max_stake: int) -> None:
    tiers = sorted({v: s for v, s in raw}.items())
    caps = [CapTier(Decimal(v), Decimal(s)) for v, s in tiers]
    reached = [s for v, s in tiers if v <= volume]
    expected = Decimal(reached[-1]) if reached else Decimal(max_stake)
    assert domain.personal_cap(Decimal(max_stake), caps, Decimal(volume)) == expected


def test_pool_spec_rules() -> None:
    p = domain.parse_pool(spec(cap_tiers=[tier("0", "50"), tier("1000", "200")]), "BTC", "pools[0]")
    assert p.cap_tiers == (CapTier(Decimal(0), Decimal(50)), CapTier(Decimal(1000), Decimal(200)))
    for fields, field in (
        ({"max_stake": "0.5"}, "pools[0].max_stake"),
        ({"pool_cap": "0.5"}, "pools[0].pool_cap"),
        ({"cap_tiers": [tier("5", "50"), tier("5", "60")]}, "pools[0].cap_tiers[1].min_volume"),
        ({"cap_tiers": [tier("0", "0.5")]}, "pools[0].cap_tiers[0].max_stake"),
        ({"total_reward": "0.000000001"}, "pools[0].total_reward"),
        ({"stake_asset": "NOPE"}, "pools[0].stake_asset"),
    ):
        with pytest.raises(InvalidArgument) as err:
            domain.parse_pool(spec(**fields), "BTC", "pools[0]")
        assert err.value.field == field, (fields, err.value.message)
    a, b = domain.parse_pool(spec(), "BTC", "x"), domain.parse_pool(spec(pool_id="p2"), "BTC", "x")
    with pytest.raises(InvalidArgument, match="one pool per stake coin"):
        domain.check_pools([a, b])


def _stake(**fields):  # type: ignore[no-untyped-def]
    base = dict(pool_id="p", asset="USDT", amount=Decimal(10), current=Decimal(0), minimum=Decimal(5), cap=Decimal(100), pool_cap=None,
                pool_staked=Decimal(0), now_us=10 * H, start_hour=10, end_hour=20, newcomer_only=False, newcomer=True)
    domain.check_stake(**{**base, **fields})


@given(units, units, units, st.one_of(st.none(), units), units)
def test_a_stake_is_accepted_exactly_within_the_limits(amount, current, cap, pool_cap, staked) -> None:  # type: ignore[no-untyped-def]
    minimum = Decimal(1)
    ok = minimum <= current + amount <= cap and (pool_cap is None or staked + amount <= pool_cap)
    try:
        _stake(amount=amount, current=current, minimum=minimum, cap=cap, pool_cap=pool_cap, pool_staked=staked)
        accepted = True
    except FailedPrecondition:
        accepted = False
    assert accepted == ok


def test_stakes_only_while_the_pool_runs_and_newcomers_only_where_asked() -> None:
    _stake(now_us=10 * H)  # the first microsecond
    _stake(now_us=20 * H - 1)  # the last one
    for now in (10 * H - 1, 20 * H):
        with pytest.raises(FailedPrecondition):
            _stake(now_us=now)
    with pytest.raises(FailedPrecondition, match="newcomers only"):
        _stake(newcomer_only=True, newcomer=False)
    _stake(newcomer_only=True, newcomer=True)


@given(units, units, units)
def test_an_unstake_leaves_nothing_or_at_least_the_minimum(amount, current, minimum) -> None:  # type: ignore[no-untyped-def]
    ok = amount <= current and (current - amount == 0 or current - amount >= minimum)
    try:
        domain.check_unstake(asset="USDT", amount=amount, current=current, minimum=minimum)
        accepted = True
    except FailedPrecondition:
        accepted = False
    assert accepted == ok


@given(st.integers(0, 100), st.integers(1, 100), st.integers(-5, 210))
def test_payout_calendar(start: int, length: int, boundary: int) -> None:
    end = start + length
    assert domain.pays_at(PayoutMode.HOURLY, start, end, boundary) == (start < boundary <= end)
    assert domain.pays_at(PayoutMode.AT_END, start, end, boundary) == (boundary == end)
    # Hourly: every hour of the project is paid exactly once, by the boundary after it.
    assert sum(domain.pays_at(PayoutMode.HOURLY, start, end, b) for b in range(start - 5, end + 5)) == length


@given(units, st.integers(1, 24 * 366))
def test_hourly_reward_times_hours_is_the_total(total: Decimal, hours: int) -> None:
    hourly = domain.hourly_reward(total, 100, 100 + hours)
    assert abs(hourly * hours - total) < Decimal("1e-60")


def test_estimated_apr() -> None:
    per_unit = domain.reward_per_unit_per_year(Decimal(1), Decimal(1050))
    assert per_unit is not None and domain.display(per_unit) == "8.342857142857142857"
    assert domain.reward_per_unit_per_year(Decimal(1), Decimal(0)) is None
    assert domain.estimated_apr(per_unit, Decimal(60000), None) is None
    apr = domain.estimated_apr(Decimal(2), Decimal(3), Decimal(4))
    assert apr == Decimal("1.5")


def test_window() -> None:
    domain.check_window(10, 11, 10)
    with pytest.raises(InvalidArgument, match="after start_time"):
        domain.check_window(10, 10, 0)
    with pytest.raises(InvalidArgument, match="in the future"):
        domain.check_window(1, 5, 5)
    with pytest.raises(InvalidArgument, match="at most"):
        domain.check_window(0, domain.MAX_PROJECT_HOURS + 1, 0)
