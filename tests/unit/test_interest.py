"""Tiered interest (services.kernel.interest) against a plain hour-by-hour reference.

The reference below is written independently of the module: it walks every hour, finds
that hour's tiers by scanning the rate history, splits the principal into brackets itself,
and sums with exact fractions.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.kernel.errors import InvalidArgument
from services.kernel.interest import (
    PositionLedger,
    RateIndex,
    Tier,
    bracket_amounts,
    hourly_accruals,
    parse_tiers,
    path_apr_hours,
)

# ----------------------------------------------------------------- independent reference


def ref_tiers_at(history: list[tuple[int, list[tuple[Fraction | None, Fraction]]]], hour: int):
    best = None
    for eff, tiers in history:  # the last fact for an hour wins, like an upsert
        if eff <= hour and (best is None or eff >= best[0]):
            best = (eff, tiers)
    return None if best is None else best[1]


def ref_hour_rate(principal: Fraction, tiers) -> Fraction:
    """principal x APR for one hour's tiers, bracket by bracket."""
    total, low = Fraction(0), Fraction(0)
    for up_to, apr in tiers:
        high = principal if up_to is None else min(principal, up_to)
        if high > low:
            total += (high - low) * apr
        if up_to is None:
            break
        low = up_to
    return total


def ref_principal(changes: list[tuple[int, Fraction]], hour: int) -> Fraction:
    return sum((d for h, d in changes if h <= hour), Fraction(0))


def ref_interest(history, changes, from_hour: int, to_hour: int) -> Fraction:
    total = Fraction(0)
    for hour in range(from_hour, to_hour):
        tiers = ref_tiers_at(history, hour)
        p = ref_principal(changes, hour)
        if tiers is not None and p > 0:
            total += ref_hour_rate(p, tiers) / 8760
    return total


def F(d: Decimal) -> Fraction:
    return Fraction(d)


# ----------------------------------------------------------------- strategies

APRS = st.decimals(min_value=0, max_value=Decimal("0.5"), places=4)
BOUNDS = st.sampled_from([Decimal(x) for x in ("0.5", "1", "2", "5", "10", "25", "100")])


@st.composite
def tier_sets(draw) -> list[Tier]:
    bounds = sorted(set(draw(st.lists(BOUNDS, max_size=3))))
    tiers = [Tier(b, draw(APRS)) for b in bounds]
    tiers.append(Tier(None, draw(APRS)))
    return tiers


@st.composite
def rate_histories(draw) -> list[tuple[int, list[Tier]]]:
    n = draw(st.integers(1, 6))
    out = []
    for _ in range(n):
        out.append((draw(st.integers(0, 60)), draw(tier_sets())))
    # Some histories reuse the previous bounds with new APRs (one segment, several epochs).
    if draw(st.booleans()) and len(out) > 1:
        base = out[0][1]
        out = [(h, [Tier(t.up_to, draw(APRS)) for t in base]) for h, _ in out]
    return out


AMOUNTS = st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal("40"), places=8)


@st.composite
def position_histories(draw) -> list[tuple[int, Decimal]]:
    changes: list[tuple[int, Decimal]] = []
    balance = Decimal(0)
    for _ in range(draw(st.integers(1, 6))):
        hour = draw(st.integers(0, 80))
        if balance > 0 and draw(st.booleans()):
            delta = -min(balance, draw(AMOUNTS))
        else:
            delta = draw(AMOUNTS)
        balance += delta
        changes.append((hour, delta))
    return changes


def to_ref_history(history):
    return [
        (h, [(None if t.up_to is None else F(t.up_to), F(t.apr)) for t in tiers]) for h, tiers in history
    ]


# ----------------------------------------------------------------- examples


def test_brackets_like_income_tax() -> None:
    tiers = [Tier(Decimal(5), Decimal("0.08")), Tier(Decimal(10), Decimal("0.03"))]
    assert bracket_amounts(Decimal(7), tiers) == [5, 2]
    # Beyond the last bounded tier nothing more.
    assert bracket_amounts(Decimal(12), tiers) == [5, 5]
    unbounded = [Tier(Decimal(5), Decimal("0.08")), Tier(None, Decimal("0.03"))]
    assert bracket_amounts(Decimal(12), unbounded) == [5, 7]
    assert bracket_amounts(Decimal(3), unbounded) == [3, 0]
    assert bracket_amounts(Decimal(0), unbounded) == [0, 0]


def test_seven_btc_for_a_year() -> None:
    index = RateIndex([(0, [Tier(Decimal(5), Decimal("0.08")), Tier(None, Decimal("0.03"))])])
    assert index.interest(Decimal(7), 0, 8760) == Decimal("0.46")  # 5 x 8% + 2 x 3%
    assert index.interest(Decimal(7), -100, 0) == 0  # before the first epoch: nothing


def _tier(up_to: str, apr: str) -> SimpleNamespace:
    return SimpleNamespace(up_to=up_to, apr=apr)


def test_parse_tiers() -> None:
    tiers = parse_tiers([_tier("5", "0.08"), _tier("", "0.03")])
    assert tiers == (Tier(Decimal(5), Decimal("0.08")), Tier(None, Decimal("0.03")))
    assert parse_tiers([_tier("", "0")]) == (Tier(None, Decimal(0)),)


@pytest.mark.parametrize(
    "tiers,field,rule",
    [
        ([], "tiers", "at least one"),
        ([_tier("5", "0.08")], "tiers[0].up_to", "unbounded"),
        ([_tier("", "0.08"), _tier("", "0.03")], "tiers[0].up_to", "only the last"),
        ([_tier("5", "0.08"), _tier("5", "0.03"), _tier("", "0")], "tiers[1].up_to", "greater than"),
        ([_tier("5", "0.08"), _tier("3", "0.03"), _tier("", "0")], "tiers[1].up_to", "greater than"),
        ([_tier("0", "0.08"), _tier("", "0.03")], "tiers[0].up_to", "greater than zero"),
        ([_tier("", "-0.01")], "tiers[0].apr", "not a plain"),
        ([_tier("", "1e-3")], "tiers[0].apr", "not a plain"),
        ([_tier("", "0.0000000000000000001")], "tiers[0].apr", "fraction digits"),
        ([_tier("", "NaN")], "tiers[0].apr", "not a plain"),
    ],
)
def test_parse_tiers_refuses(tiers, field: str, rule: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_tiers(tiers)
    assert err.value.field == field
    assert rule in err.value.message


def test_bracket_change_between_epochs_is_exact() -> None:
    index = RateIndex()
    index.set_rates(10, [Tier(Decimal(5), Decimal("0.08")), Tier(None, Decimal("0.03"))])
    index.set_rates(20, [Tier(Decimal(2), Decimal("0.1")), Tier(None, Decimal("0.01"))])
    index.set_rates(30, [Tier(Decimal(2), Decimal("0.2")), Tier(None, Decimal("0.02"))])
    units = index.apr_hours(Decimal(7), 0, 40)
    expected = 10 * (5 * Decimal("0.08") + 2 * Decimal("0.03")) + 10 * (2 * Decimal("0.1") + 5 * Decimal("0.01"))
    expected += 10 * (2 * Decimal("0.2") + 5 * Decimal("0.02"))
    assert units == expected
    # Replaying a fact changes nothing; serialization round-trips.
    assert not index.set_rates(20, [Tier(Decimal(2), Decimal("0.1")), Tier(None, Decimal("0.01"))])
    assert RateIndex.from_json(index.to_json()) == index
    assert RateIndex.from_json(index.to_json()).apr_hours(Decimal(7), 0, 40) == expected


def test_late_change_settles_at_its_own_hour() -> None:
    index = RateIndex([(0, [Tier(None, Decimal("0.0876"))])])  # 0.00001 per hour per unit
    ledger = PositionLedger()
    ledger.apply_change(index, 0, Decimal(100))
    first = ledger.take_payout(index, 24, 8)
    assert first.paid == Decimal("0.024") and first.from_hour == 0
    # A subscription effective at hour 10 arrives after the payout at hour 24.
    ledger.apply_change(index, 10, Decimal(100))
    second = ledger.take_payout(index, 48, 8)
    assert second.paid == Decimal("0.014") + Decimal("0.048")
    assert second.from_hour == 24


# ----------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(history=rate_histories(), principal=AMOUNTS, a=st.integers(-5, 90), length=st.integers(0, 60))
def test_index_equals_hour_by_hour(history, principal, a, length) -> None:
    index = RateIndex()
    for hour, tiers in history:
        index.set_rates(hour, tiers)
    b = a + length
    got = F(index.apr_hours(principal, a, b)) / 8760
    assert got == ref_interest(to_ref_history(history), [(-10**6, F(principal))], a, b)


@settings(max_examples=300, deadline=None)
@given(
    history=rate_histories(),
    changes=position_histories(),
    boundaries=st.lists(st.integers(0, 100), min_size=1, max_size=5),
    scale=st.sampled_from([0, 2, 6, 8, 18]),
    late=st.booleans(),
)
def test_payouts_pay_the_exact_total_truncated(history, changes, boundaries, scale, late) -> None:
    index = RateIndex()
    for hour, tiers in history:
        index.set_rates(hour, tiers)
    boundaries = sorted(boundaries)
    ledger = PositionLedger()
    ref_changes = [(h, F(d)) for h, d in changes]
    paid_total = Decimal(0)
    if late:
        # Changes arrive interleaved with payouts (some after a payout that covered their
        # hour): each still counts exactly, in the next payout. Redemptions of amounts
        # not yet subscribed are impossible upstream, so deliver in hour order. A
        # redemption is never late: upstream it is published before any later payout
        # request (interest already paid is not clawed back), so a payout first receives
        # every change up to the last redemption before its boundary.
        pending = sorted(changes, key=lambda c: c[0])
        for boundary in boundaries:
            due = max((i + 1 for i, (h, d) in enumerate(pending) if d < 0 and h < boundary), default=0)
            while pending and (pending[0][0] < boundary - 3 or due > 0):
                ledger.apply_change(index, *pending.pop(0))
                due -= 1
            paid_total += ledger.take_payout(index, boundary, scale).paid
        for change in pending:
            ledger.apply_change(index, *change)
    else:
        for change in changes:
            ledger.apply_change(index, *change)
        for boundary in boundaries:
            taken = ledger.take_payout(index, boundary, scale)
            assert taken.paid >= 0
            paid_total += taken.paid
    end = 100
    final = ledger.take_payout(index, end, scale)
    paid_total += final.paid
    exact = ref_interest(to_ref_history(history), ref_changes, -10, end)
    unit = Fraction(1, 10**scale)
    assert F(paid_total) == (exact // unit) * unit  # the exact total truncated, never more
    assert F(paid_total) + F(ledger.carry_units) / 8760 == exact  # nothing lost
    assert 0 <= F(ledger.carry_units) / 8760 < unit
    assert F(ledger.principal) == ref_principal(ref_changes, 10**6)


@settings(max_examples=150, deadline=None)
@given(history=rate_histories(), changes=position_histories(), a=st.integers(0, 50), length=st.integers(0, 40))
def test_hourly_records_sum_to_the_span(history, changes, a, length) -> None:
    index = RateIndex()
    for hour, tiers in history:
        index.set_rates(hour, tiers)
    records = hourly_accruals(index, changes, a, a + length)
    ref = ref_interest(to_ref_history(history), [(h, F(d)) for h, d in changes], a, a + length)
    # Each record is rounded down at money.EXACT precision: compare with a tolerance of
    # one ulp per record; the span's exact sum through the index is exact.
    assert abs(sum((F(r.amount) for r in records), Fraction(0)) - ref) <= Fraction(len(records), 10**70)
    ledger = PositionLedger()
    for change in changes:
        ledger.apply_change(index, *change)
    assert F(path_apr_hours(index, ledger.changes, a, a + length)) / 8760 == ref
    assert all(r.principal > 0 and a <= r.hour < a + length for r in records)


# ----------------------------------------------------------------- engine state (pure)


def test_a_payout_batch_fits_one_wallet_credit() -> None:
    """Simple Earn pays a PayoutBatch with one BulkCredit (one credit per user at most)."""
    from services.accrual import domain
    from services.wallet import domain as wallet

    assert max(domain.BATCH_SIZE, domain.LEGACY_BATCH_SIZE) <= wallet.MAX_BATCH  # a replay may use the old size


def test_payout_history() -> None:
    from services.accrual import domain

    history = domain.PayoutHistory()
    first, status = history.record("j", "d1", 24, offset=5)
    assert status == "new" and first is not None and first.previous is None and first.batch_size == domain.BATCH_SIZE
    assert history.record("j", "d1", 24, offset=5) == (first, "replay")  # after a crash: finish the work
    assert history.record("j", "d1", 24, offset=9) == (first, "duplicate")  # published again
    second, status = history.record("j", "d2", 48, offset=10)
    assert status == "new" and second is not None and second.previous == 24
    assert history.record("j", "d0", 12, offset=11) == (None, "stale")  # nothing after 48 to pay
    assert domain.PayoutHistory.from_list(history.to_list()) == history
    # Stored before entries kept their batch size: emitted in batches of the size then.
    legacy = domain.PayoutHistory.from_list([["j", "d1", 24, None, 5]])
    assert legacy.entries == [domain.PayoutEntry("j", "d1", 24, None, 5, domain.LEGACY_BATCH_SIZE)]


def test_format_minor() -> None:
    from services.accrual.domain import format_minor

    assert [format_minor(v, 8) for v in (0, 1, 10**8, 123456789, 120000000)] == ["0", "0.00000001", "1", "1.23456789", "1.2"]
    assert format_minor(5, 0) == "5"


@given(st.integers(min_value=0, max_value=10**30), st.integers(min_value=0, max_value=18))
def test_format_minor_is_the_canonical_decimal(value: int, scale: int) -> None:
    from services.accrual.domain import format_minor
    from decimal import localcontext

    from services.kernel.money import EXACT, format_amount

    with localcontext(EXACT):
        expected = format_amount(Decimal(value).scaleb(-scale))
    assert format_minor(value, scale) == expected


def _split(principal: int, bounds: list[int | None]) -> list[int]:
    """How much of ``principal`` falls in each bracket: the plain reference."""
    out, lower = [], 0
    for up in bounds:
        out.append(0 if principal <= lower else (principal - lower if up is None or principal < up else up - lower))
        if up is not None:
            lower = up
    return out


@st.composite
def bracket_bounds(draw) -> list[int | None]:  # type: ignore[no-untyped-def]
    ups = sorted(set(draw(st.lists(st.integers(1, 10**24), max_size=4))))
    return [*ups, None] if draw(st.booleans()) or not ups else ups


@given(bounds=bracket_bounds(), principal=st.integers(-(10**20), 10**25), data=st.data())
def test_top_bracket_units_equal_the_bracket_split(bounds, principal, data) -> None:
    """The payout loop's one product per position (``fill[j] + r x apr_hours[j]``) equals
    the sum over every bracket of its share of the principal times its APR-hours."""
    from services.accrual.domain import bracket_units, top_bracket

    hours = data.draw(st.lists(st.integers(0, 10**22), min_size=len(bounds), max_size=len(bounds)))
    expected = sum(share * h for share, h in zip(_split(principal, bounds), hours))
    assert bracket_units(top_bracket(principal, bounds), bounds, hours) == expected


def test_book_keeps_payout_order_through_changes_and_removals() -> None:
    from services.accrual import domain

    def view(position_id: str, user: str = "u") -> domain.Position:
        state = domain.PositionState(position_id=position_id, product_id="p", user_id=user, asset="USDT")
        return domain.position_view(state, None, 0)

    book = domain.Book()
    for pid in ("2", "10", "3", "1"):  # out of order: sorted before the next payout
        book.put(view(pid))
    assert [p.position_id for p in book.ordered("p")] == ["1", "2", "3", "10"]
    book.put(view("3", user="v"))  # a change replaces its slot
    book.remove("p", "2")
    book.put(view("11"))  # appended after a hole
    assert book.get("p", "2") is None and book.get("p", "3").user_id == "v"  # type: ignore[union-attr]
    assert [p.position_id for p in book.ordered("p")] == ["1", "3", "10", "11"]
    assert len(book) == 4 and book.ordered("other") == []
    book.remove("p", "11")
    book.put(view("4"))  # after a hole at the end: still ordered
    assert [p.position_id for p in book.ordered("p")] == ["1", "3", "4", "10"]
    assert book.get("p", "4").position_id == "4"  # type: ignore[union-attr]
