"""CandyDrop's pure rules against references written differently: prizes (water-filling
under a cap by sorting, fixed-per-candy scaling), counting (order-independent, window,
registration), never more than the pool or the cap, dust under one unit per winner."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from services.candydrop import domain
from services.candydrop.domain import Fact, PoolKind, Task, TaskKind
from services.kernel.errors import InvalidArgument

T0 = datetime(2031, 1, 1, tzinfo=UTC)


# ---- references ------------------------------------------------------------------------


def ref_pro_rata(pool: Fraction, cap: Fraction | None, candies: dict[str, int]) -> dict[str, Fraction]:
    """Sort by candies, descending; cap the first k users, split the rest by candies; the
    smallest k for which the next user's share fits under the cap."""
    users = sorted((u for u in candies if candies[u] > 0), key=lambda u: -candies[u])
    for k in range(len(users) + 1):
        capped, rest = users[:k], users[k:]
        left = pool - (cap or 0) * k
        weight = sum(candies[u] for u in rest)
        if cap is None or not rest or left * candies[rest[0]] / weight <= cap:
            out = {u: cap for u in capped}  # type: ignore[misc]
            out.update({u: left * candies[u] / weight for u in rest})
            return out  # type: ignore[return-value]
    raise AssertionError("unreachable")


def ref_fixed(pool: Fraction, per: Fraction, cap: Fraction | None, candies: dict[str, int]) -> dict[str, Fraction]:
    want = {u: min(per * c, cap) if cap is not None else per * c for u, c in candies.items() if c > 0}
    total = sum(want.values(), Fraction(0))
    factor = min(Fraction(1), pool / total) if total else Fraction(1)
    return {u: w * factor for u, w in want.items()}


def floor_units(value: Fraction, scale: int) -> int:
    return value.numerator * 10**scale // value.denominator


# ---- prizes ----------------------------------------------------------------------------

amounts = st.integers(min_value=1, max_value=10**12)  # in units of 10**-6
candy_maps = st.dictionaries(st.sampled_from([f"u{i}" for i in range(12)]), st.integers(min_value=0, max_value=10**6), max_size=12)


@settings(max_examples=400, deadline=None)
@given(pool=amounts, cap=st.none() | amounts, candies=candy_maps)
def test_pro_rata_matches_the_reference_and_never_exceeds_pool_or_cap(pool: int, cap: int | None, candies: dict[str, int]) -> None:
    scale = 6
    pool_d, cap_d = Decimal(pool).scaleb(-scale), None if cap is None else Decimal(cap).scaleb(-scale)
    got = domain.prizes(kind=PoolKind.PRO_RATA, pool=pool_d, per_candy=None, cap=cap_d, candies=candies, scale=scale)
    ref = ref_pro_rata(Fraction(pool_d), None if cap_d is None else Fraction(cap_d), candies)
    assert set(got) == set(ref)
    for u, v in ref.items():
        assert got[u] == Decimal(floor_units(v, scale)).scaleb(-scale)
        assert cap_d is None or got[u] <= cap_d
    paid = sum(got.values(), Decimal(0))
    assert paid <= pool_d
    # The shortfall is dust (< one unit per winner) unless every winner is at the cap.
    if got and not (cap_d is not None and all(v == cap_d for v in got.values())):
        assert (pool_d - paid) * 10**scale < len(got)


@settings(max_examples=400, deadline=None)
@given(pool=amounts, per=st.integers(min_value=1, max_value=10**9), cap=st.none() | amounts, candies=candy_maps)
def test_fixed_per_candy_matches_the_reference(pool: int, per: int, cap: int | None, candies: dict[str, int]) -> None:
    scale = 6
    pool_d, per_d = Decimal(pool).scaleb(-scale), Decimal(per).scaleb(-scale)
    cap_d = None if cap is None else Decimal(cap).scaleb(-scale)
    got = domain.prizes(kind=PoolKind.FIXED_PER_CANDY, pool=pool_d, per_candy=per_d, cap=cap_d, candies=candies, scale=scale)
    ref = ref_fixed(Fraction(pool_d), Fraction(per_d), None if cap_d is None else Fraction(cap_d), candies)
    assert got == {u: Decimal(floor_units(v, scale)).scaleb(-scale) for u, v in ref.items()}
    paid = sum(got.values(), Decimal(0))
    assert paid <= pool_d
    assert all(cap_d is None or v <= cap_d for v in got.values())
    demand = sum(ref.values(), Fraction(0))
    if got and demand >= Fraction(pool_d):
        assert (pool_d - paid) * 10**scale < len(got)  # the pool runs out: only dust is left


def test_pro_rata_examples() -> None:
    # 3 units split 1:2 -> 1 and 2; with a cap of 1.5 the capped excess goes to the other.
    assert domain.prizes(kind=PoolKind.PRO_RATA, pool=Decimal(3), per_candy=None, cap=None, candies={"a": 1, "b": 2}, scale=8) == {
        "a": Decimal(1), "b": Decimal(2)}
    assert domain.prizes(kind=PoolKind.PRO_RATA, pool=Decimal(4), per_candy=None, cap=Decimal("1.5"), candies={"a": 1, "b": 2, "c": 5}, scale=8) == {
        "a": Decimal("1"), "b": Decimal("1.5"), "c": Decimal("1.5")}
    # 1 unit over 3 equal users: truncated, dust of 1 unit of the 8th digit stays.
    got = domain.prizes(kind=PoolKind.PRO_RATA, pool=Decimal(1), per_candy=None, cap=None, candies={"a": 1, "b": 1, "c": 1}, scale=8)
    assert got == {u: Decimal("0.33333333") for u in "abc"}
    assert domain.prizes(kind=PoolKind.PRO_RATA, pool=Decimal(1), per_candy=None, cap=None, candies={"a": 0}, scale=8) == {}


def test_value_per_candy() -> None:
    assert domain.value_per_candy(kind=PoolKind.PRO_RATA, pool=Decimal(10), per_candy=None, total_candies=0) is None
    assert domain.value_per_candy(kind=PoolKind.PRO_RATA, pool=Decimal(10), per_candy=None, total_candies=4) == Decimal("2.5")
    assert domain.value_per_candy(kind=PoolKind.FIXED_PER_CANDY, pool=Decimal(10), per_candy=Decimal(2), total_candies=4) == 2
    assert domain.value_per_candy(kind=PoolKind.FIXED_PER_CANDY, pool=Decimal(10), per_candy=Decimal(2), total_candies=8) == Decimal("1.25")
    assert domain.display(Decimal(1) / Decimal(3)) == "0.333333333333333333"


# ---- counting --------------------------------------------------------------------------

TASKS = (
    Task("spot", TaskKind.SPOT_VOLUME, "USDT", Decimal(100), 2, 5),
    Task("fut", TaskKind.FUTURES_VOLUME, "USDT", Decimal("1000.5"), 7, 3),
    Task("dep", TaskKind.DEPOSIT, "BTC", Decimal("0.1"), 1, 10),
    Task("first", TaskKind.FIRST_DEPOSIT, "", None, 50, 1),
    Task("earn", TaskKind.SIMPLE_EARN_SUBSCRIPTION, "BTC", Decimal("0.5"), 3, 2),
)
START, END = T0 + timedelta(hours=1), T0 + timedelta(hours=5)

facts = st.builds(
    lambda kind, asset, units, minutes, first: Fact(kind, "u", asset, Decimal(units).scaleb(-4), T0 + timedelta(minutes=minutes), first),
    st.sampled_from(list(TaskKind)), st.sampled_from(["USDT", "BTC", "ETH"]), st.integers(1, 10**7),
    st.integers(0, 6 * 60), st.booleans(),
)


def ref_candies(events: list[Fact], registered: datetime) -> int:
    """Per task: the events that count, summed; completions by integer division."""
    total = 0
    for t in TASKS:
        ok = [f for f in events if f.kind is t.kind and START <= f.at < END and f.at >= registered]
        if t.kind is TaskKind.FIRST_DEPOSIT:
            total += t.candies if any(f.first_deposit for f in ok) else 0
            continue
        s = sum((Fraction(f.amount) for f in ok if f.asset == t.asset), Fraction(0))
        total += min(int(s // Fraction(t.threshold)), t.max_completions) * t.candies  # type: ignore[arg-type]
    return total


@settings(max_examples=300, deadline=None)
@given(events=st.lists(facts, max_size=30), registered_minutes=st.integers(0, 6 * 60), seed=st.randoms())
def test_candies_match_the_reference_in_any_order(events: list[Fact], registered_minutes: int, seed) -> None:  # type: ignore[no-untyped-def]
    registered = T0 + timedelta(minutes=registered_minutes)

    def count(order: list[Fact]) -> int:
        progress: dict[str, Decimal] = defaultdict(Decimal)
        for f in order:
            for t in TASKS:
                add = domain.counts(fact=f, task=t, start=START, end=END, registered_at=registered)
                if t.kind is TaskKind.FIRST_DEPOSIT:
                    progress[t.task_id] = max(progress[t.task_id], add)
                else:
                    progress[t.task_id] += add
        return domain.user_candies(TASKS, progress)

    shuffled = list(events)
    seed.shuffle(shuffled)
    assert count(events) == count(shuffled) == ref_candies(events, registered)


def test_counting_edges() -> None:
    spot = TASKS[0]
    fact = Fact(TaskKind.SPOT_VOLUME, "u", "USDT", Decimal(150), START)
    assert domain.counts(fact=fact, task=spot, start=START, end=END, registered_at=START) == 150  # the start counts
    assert domain.counts(fact=fact, task=spot, start=START, end=END, registered_at=None) == 0  # not registered
    late = Fact(TaskKind.SPOT_VOLUME, "u", "USDT", Decimal(150), END)
    assert domain.counts(fact=late, task=spot, start=START, end=END, registered_at=START) == 0  # the end does not
    early = Fact(TaskKind.SPOT_VOLUME, "u", "USDT", Decimal(150), START + timedelta(seconds=1))
    assert domain.counts(fact=early, task=spot, start=START, end=END, registered_at=START + timedelta(seconds=2)) == 0
    assert domain.completions(spot, Decimal("99.999999")) == 0
    assert domain.completions(spot, Decimal(100)) == 1
    assert domain.completions(spot, Decimal(10**9)) == 5  # the repeat limit
    assert domain.facts_of_deposit("u", "BTC", Decimal(1), START, True)[1].kind is TaskKind.FIRST_DEPOSIT


def test_task_parsing() -> None:
    t = domain.parse_task(task_id="t1", kind=TaskKind.DEPOSIT, asset="BTC", threshold="0.5", candies=3, max_completions=2, field="tasks[0]")
    assert t.threshold == Decimal("0.5")
    first = domain.parse_task(task_id="f", kind=TaskKind.FIRST_DEPOSIT, asset="", threshold="", candies=3, max_completions=1, field="tasks[1]")
    assert first.asset == "" and first.threshold is None
    bad = [
        (dict(task_id="", kind=TaskKind.DEPOSIT, asset="BTC", threshold="1", candies=1, max_completions=1), "tasks[0].task_id:"),
        (dict(task_id="t", kind=None, asset="BTC", threshold="1", candies=1, max_completions=1), "tasks[0].kind:"),
        (dict(task_id="t", kind=TaskKind.DEPOSIT, asset="", threshold="1", candies=1, max_completions=1), "tasks[0].asset:"),
        (dict(task_id="t", kind=TaskKind.DEPOSIT, asset="XYZ", threshold="1", candies=1, max_completions=1), "tasks[0].asset:"),
        (dict(task_id="t", kind=TaskKind.DEPOSIT, asset="BTC", threshold="", candies=1, max_completions=1), "tasks[0].threshold:"),
        (dict(task_id="t", kind=TaskKind.DEPOSIT, asset="BTC", threshold="0.000000001", candies=1, max_completions=1), "tasks[0].threshold:"),
        (dict(task_id="t", kind=TaskKind.DEPOSIT, asset="BTC", threshold="1", candies=0, max_completions=1), "tasks[0].candies:"),
        (dict(task_id="t", kind=TaskKind.DEPOSIT, asset="BTC", threshold="1", candies=1, max_completions=0), "tasks[0].max_completions:"),
        (dict(task_id="t", kind=TaskKind.FIRST_DEPOSIT, asset="", threshold="", candies=1, max_completions=2), "tasks[0].max_completions:"),
    ]
    for kwargs, fragment in bad:
        with pytest.raises(InvalidArgument) as err:
            domain.parse_task(field="tasks[0]", **kwargs)  # type: ignore[arg-type]
        assert err.value.message.startswith(fragment), err.value.message
