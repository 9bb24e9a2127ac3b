"""Simple Earn rules (pure): tier brackets, hours, redemption split, maturity interest,
payout previews. The interest maths is the kernel's (services.kernel.interest): the
bracket and accrual expectations below cross-check it."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st

from earn.v1 import accrual_pb2
from services.kernel import interest
from services.kernel.errors import FailedPrecondition, InvalidArgument
from services.kernel.interest import PositionLedger, RateIndex, Tier
from services.kernel.money import EXACT, truncate
from services.simple_earn import domain
from services.simple_earn.domain import Limits, RedemptionSplit, Status

TIERS = (Tier(Decimal(5), Decimal("0.08")), Tier(None, Decimal("0.03")))
sats = st.integers(1, 10**12).map(lambda n: Decimal(n).scaleb(-8))


def raw(*pairs: tuple[str, str]) -> list[accrual_pb2.RateTier]:
    return [accrual_pb2.RateTier(up_to=u, apr=a) for u, a in pairs]


def test_seven_btc_earns_bracket_rates_like_income_tax() -> None:
    assert interest.bracket_amounts(Decimal(7), TIERS) == [Decimal(5), Decimal(2)]
    assert interest.hourly_apr_units(Decimal(7), TIERS) == Decimal("0.46")
    assert interest.units_to_amount(interest.hourly_apr_units(Decimal(7), TIERS)) * 8760 == Decimal("0.46")


@given(sats, st.lists(st.integers(1, 10**6), min_size=0, max_size=5, unique=True))
def test_brackets_partition_the_principal(principal: Decimal, bounds: list[int]) -> None:
    bounds.sort()
    tiers = tuple(Tier(Decimal(b), Decimal(i + 1) / 100) for i, b in enumerate(bounds)) + (Tier(None, Decimal("0.5")),)
    parts = interest.bracket_amounts(principal, tiers)
    assert sum(parts) == principal
    # The filled brackets come first, each positive; the rest are empty.
    filled = [a for a in parts if a > 0]
    assert parts == filled + [Decimal(0)] * (len(parts) - len(filled))
    # Never more than the top rate on everything, never less than the lowest.
    weighted = interest.hourly_apr_units(principal, tiers)
    assert min(t.apr for t in tiers) * principal <= weighted <= max(t.apr for t in tiers) * principal


def test_parse_tiers_rules() -> None:
    assert domain.parse_tiers(raw(("5", "0.08"), ("", "0.03")), "BTC") == TIERS
    cases = [
        ([], "tiers"),
        ([("5", "0.08")], "tiers[0].up_to"),
        ([("", "0.08"), ("", "0.03")], "tiers[0].up_to"),
        ([("5", "0.08"), ("5", "0.01"), ("", "0")], "tiers[1].up_to"),
        ([("5", "0.08"), ("4", "0.01"), ("", "0")], "tiers[1].up_to"),
        ([("5.000000001", "0.08"), ("", "0")], "tiers[0].up_to"),  # finer than BTC's scale
        ([(str(i + 1), "0.01") for i in range(16)] + [("", "0")], "tiers"),  # at most 16 tiers
        ([("", "-0.01")], "tiers[0].apr"),
        ([("", "0." + "1" * 19)], "tiers[0].apr"),
        ([("", "1e-2")], "tiers[0].apr"),
    ]
    for pairs, field in cases:
        with pytest.raises(InvalidArgument) as err:
            domain.parse_tiers(raw(*pairs), "BTC")
        assert err.value.field == field, pairs
    assert domain.parse_tiers(raw(("", "0")), "USDT") == (Tier(None, Decimal(0)),)
    assert domain.parse_tiers(raw(("0.000000000000000001", "0.1"), ("", "0")), "ETH")[0].up_to == Decimal("1e-18")


@given(st.integers(0, 4 * 10**9))
def test_next_full_hour_is_the_first_boundary_after(seconds: int) -> None:
    at = datetime.fromtimestamp(seconds, tz=UTC) + timedelta(microseconds=1)
    hour = domain.next_full_hour(at)
    assert domain.hour_start(hour) > at >= domain.hour_start(hour - 1)
    assert domain.unix_hour(at) == hour - 1


@given(sats, sats, sats)
def test_redemption_takes_pending_first(a: Decimal, b: Decimal, c: Decimal) -> None:
    accruing, pending = a, b
    total = accruing + pending
    amount = min(c, total)
    split = domain.split_redemption(amount, total, accruing)
    assert split.pending + split.accruing == amount
    assert split.pending == min(amount, pending)
    assert 0 <= split.accruing <= accruing
    hour = 1000
    changes = domain.redemption_changes(hour, split)
    history = [(hour, accruing), (hour + 1, pending), *changes]
    # After it: this hour accrues only what was accruing and not redeemed; the principal
    # left is what accrues from the next hour on.
    assert domain.accruing_at(history, hour) == accruing - split.accruing
    assert domain.accruing_at(history, hour + 1) == total - amount


def test_redemption_over_principal_is_refused() -> None:
    with pytest.raises(FailedPrecondition):
        domain.split_redemption(Decimal(2), Decimal(1), Decimal(1))
    assert domain.redemption_changes(7, RedemptionSplit(Decimal(1), Decimal(2))) == [(7, Decimal(-2)), (8, Decimal(-1))]


@given(st.lists(sats, min_size=1, max_size=6), st.data())
def test_holds_release_newest_first(remaining: list[Decimal], data: st.DataObject) -> None:
    holds = [(i + 1, r) for i, r in enumerate(remaining)][::-1]  # newest first
    total = sum(remaining)
    amount = data.draw(st.integers(1, int(total * 10**8)).map(lambda n: Decimal(n).scaleb(-8)))
    takes = domain.take_from_holds(amount, holds)
    assert sum(t for _, t in takes) == amount
    assert [h for h, _ in takes] == [h for h, _ in holds][: len(takes)]
    assert all(t == r for (_, t), (_, r) in zip(takes[:-1], holds, strict=False))


@given(sats, st.integers(1, 3650))
def test_maturity_interest_is_truncated_exact_interest(principal: Decimal, days: int) -> None:
    hours = days * 24
    paid = domain.fixed_interest(principal, TIERS, hours, "BTC")
    with localcontext(EXACT):
        exact = (min(principal, 5) * Decimal("0.08") + max(principal - 5, 0) * Decimal("0.03")) * hours / 8760
    assert paid <= exact < paid + Decimal("0.00000001")
    assert paid == paid.quantize(Decimal("0.00000001"))


def test_maturity_interest_example() -> None:
    # 7 BTC for 30 days: (5 x 0.08 + 2 x 0.03) x 720 / 8760 = 0.0378082191780...
    assert domain.fixed_interest(Decimal(7), TIERS, 720, "BTC") == Decimal("0.03780821")
    assert domain.maturity_hour(100, 30) == 100 + 720


def test_subscription_limits_name_the_rule() -> None:
    limits = Limits(Decimal(1), Decimal(10), Decimal(100))
    base = dict(product_id="p", asset="BTC", status=Status.ACTIVE, limits=limits, user_total=Decimal(0), subscribed=Decimal(0))
    domain.check_subscription(**base, amount=Decimal(1))  # type: ignore[arg-type]
    for override, words in [
        ({"status": Status.PAUSED}, "product p is paused"),
        ({"amount": Decimal("0.5")}, "min_subscription"),
        ({"amount": Decimal(3), "user_total": Decimal(8)}, "2 BTC left for this user"),
        ({"amount": Decimal(5), "subscribed": Decimal(97)}, "left quota of product p: 3 BTC"),
    ]:
        args = {**base, "amount": Decimal(1), **override}
        with pytest.raises(FailedPrecondition) as err:
            domain.check_subscription(**args)  # type: ignore[arg-type]
        assert words in err.value.message


def test_hourly_records_follow_rate_and_principal_history() -> None:
    changes = [(10, Decimal(7)), (12, Decimal(-2))]
    rates = [(9, TIERS), (11, (Tier(None, Decimal("0.10")),)), (11, (Tier(None, Decimal("0.20")),))]
    records = domain.hourly_records(changes, rates, 9, 14)
    assert [(h, p) for h, p, _ in records] == [(10, Decimal(7)), (11, Decimal(7)), (12, Decimal(5)), (13, Decimal(5))]
    with localcontext(EXACT):
        assert records[0][2] == Decimal("0.46") / 8760
        assert records[1][2] == Decimal("1.4") / 8760  # the later of two changes for hour 11 wins
        assert records[2][2] == Decimal("1.0") / 8760


def test_hourly_records_list_a_zero_rate_hour_with_zero() -> None:
    rates = [(9, (Tier(None, Decimal(0)),)), (11, TIERS)]
    records = domain.hourly_records([(10, Decimal(1))], rates, 9, 12)
    assert records == [(10, Decimal(1), Decimal(0)), (11, Decimal(1), interest.units_to_amount(Decimal("0.08")))]


def test_fixed_interest_is_the_kernel_rate_index_interest() -> None:
    index = RateIndex([(100, TIERS)])
    assert domain.fixed_interest(Decimal(7), TIERS, 720, "BTC") == truncate(index.interest(Decimal(7), 100, 820), 8)
    assert domain.fixed_interest(Decimal(7), TIERS, 0, "BTC") == 0


change_lists = st.lists(
    st.tuples(st.integers(0, 60), st.integers(1, 10**9).map(lambda n: Decimal(n).scaleb(-8)), st.booleans()), min_size=1, max_size=8
)
epochs = st.lists(
    st.tuples(st.integers(0, 60), st.sampled_from([TIERS, (Tier(None, Decimal("0.05")),), (Tier(Decimal(2), Decimal("0.2")), Tier(None, Decimal(0)))])),
    min_size=1, max_size=4,
)


@given(change_lists, epochs, st.lists(st.integers(1, 80), min_size=1, max_size=6, unique=True), st.sampled_from([2, 6, 8]))
def test_payout_preview_equals_what_the_engine_ledger_pays(
    raw_changes: list[tuple[int, Decimal, bool]], rate_epochs: list, boundaries: list[int], scale: int
) -> None:
    # A principal history that never goes negative: redemptions take at most what is there.
    changes: list[tuple[int, Decimal]] = []
    for hour, amount, is_redemption in sorted(raw_changes, key=lambda c: c[0]):
        held = domain.accruing_at(changes, 10**6)
        delta = -min(amount, held) if is_redemption else amount
        if delta:
            changes.append((hour, delta))
    index = domain.rate_index(rate_epochs)
    ledger = PositionLedger()
    for hour, delta in changes:
        ledger.apply_change(index, hour, delta)
    previous: int | None = None
    for boundary in sorted(boundaries):
        preview = domain.preview_payout(index, changes, boundary, previous, scale)
        # The engine pays a position once it started accruing before the boundary.
        started = ledger.settled_through is not None or (ledger.changes and ledger.changes[0][0] < boundary)
        if not started:
            assert preview is None or preview.amount == 0
            continue
        taken = ledger.take_payout(index, boundary, scale)
        assert preview is not None
        assert (preview.amount, preview.from_hour) == (taken.paid, taken.from_hour), (boundary, previous)
        previous = boundary


# ---- payout batch columns -------------------------------------------------------------------

def _one_by_one(position_id: str, user_id: str, amount: str, asset: str) -> bool:
    """The per-item rules the column check must agree with: the strict kernel grammar."""
    from services.kernel.money import parse_amount

    try:
        domain.check_position_id(position_id)
        domain.check_user_id(user_id)
        parse_amount(amount, asset)
    except InvalidArgument:
        return False
    return True


texts = st.one_of(
    st.sampled_from(["0", "00", "0.0", "0.000000001", "1", "1.5", "01", "1e3", "-1", " 1", "1\n2", "", "NaN", "0.00000001", "99999999999999999999", "999999999999999999999", "7", "u-1", "a b", "x" * 65]),
    st.text(alphabet="0123456789.e-\n ab", max_size=12),
)


@given(st.lists(st.tuples(texts, texts, texts), max_size=8), st.sampled_from(["BTC", "USDT", "ETH"]))
def test_payout_columns_keep_exactly_the_items_each_rule_accepts(items: list[tuple[str, str, str]], asset: str) -> None:
    ids, users, amounts = ([i[k] for i in items] for k in range(3))
    checked = domain.check_payout_columns(ids, users, amounts, asset)
    seen: set[str] = set()
    expected_kept = []
    for n, (position_id, user_id, amount) in enumerate(items):
        if _one_by_one(position_id, user_id, amount, asset) and position_id not in seen:
            expected_kept.append(n)
        seen.add(position_id)
    kept = list(range(len(items))) if checked.kept is None else checked.kept
    assert kept == expected_kept
    assert sorted(checked.problems) == [n for n in range(len(items)) if n not in expected_kept]
    assert checked.position_ids.split("\n") == [ids[n] for n in kept] or (not kept and checked.position_ids == "")
    assert checked.amounts.count("\n") == max(0, len(kept) - 1) and checked.user_ids.count("\n") == max(0, len(kept) - 1)


def test_payout_columns_name_each_item_left_out() -> None:
    checked = domain.check_payout_columns(
        ["1", "2", "x", "4", "1", "6"], ["u1", "u2", "u3", "bad user", "u1", "u6"], ["0.5", "0", "1", "1", "0.5", "0.000000001"], "BTC"
    )
    assert checked.kept == [0]
    assert checked.position_ids == "1" and checked.user_ids == "u1" and checked.amounts == "0.5"
    assert "not a decimal > 0" in checked.problems[1] and "not a position id" in checked.problems[2]
    assert "user id grammar" in checked.problems[3] and "more than once" in checked.problems[4] and "fraction digits" in checked.problems[5]
    with pytest.raises(InvalidArgument, match="position_ids"):
        domain.check_payout_columns(["1"], [], ["1"], "BTC")
    with pytest.raises(InvalidArgument, match="asset"):
        domain.check_payout_columns(["1"], ["u"], ["1"], "NOPE")


def test_bulk_credits_are_one_per_user_in_batch_order() -> None:
    assert domain.bulk_credits(["a", "b"], ["1", "2"], None) == (["a", "b"], ["1", "2"])
    assert domain.bulk_credits(["a", "b", "c"], ["1", "2", "3"], [0, 2]) == (["a", "c"], ["1", "3"])
    # A user with two positions in the batch (one closed, one open) gets one credit of their sum.
    assert domain.bulk_credits(["a", "b", "a"], ["0.1", "2", "0.25"], None) == (["a", "b"], ["0.35", "2"])


# ---- a batch of Subscribes (group commit) ----------------------------------------------

_orders = st.lists(
    st.builds(domain.Order, user_id=st.sampled_from(["u1", "u2", "u3"]), amount=st.integers(1, 40).map(Decimal)), max_size=30
)


@given(
    orders=_orders,
    kind=st.sampled_from(list(domain.Kind)),
    paused=st.booleans(),
    min_subscription=st.integers(1, 5).map(Decimal),
    max_per_user=st.none() | st.integers(1, 100).map(Decimal),
    quota=st.none() | st.integers(0, 200).map(Decimal),
    held=st.dictionaries(st.sampled_from(["u1", "u2", "u3"]), st.integers(1, 30).map(Decimal)),
)
def test_a_batch_decides_each_subscribe_as_if_they_came_one_after_another(
    orders, kind, paused, min_subscription, max_per_user, quota, held
) -> None:
    limits = Limits(min_subscription, max_per_user, quota)
    status = Status.PAUSED if paused else Status.ACTIVE
    subscribed = sum(held.values(), Decimal(0))
    open_flexible = {u: 100 + i for i, u in enumerate(sorted(held))} if kind is domain.Kind.FLEXIBLE else {}
    plan = domain.plan_subscriptions(
        product_id="p", asset="BTC", kind=kind, status=status, limits=limits, subscribed=subscribed,
        user_totals=held, open_flexible=open_flexible, orders=orders,
    )
    # The reference: one Subscribe at a time against the state the earlier ones left.
    totals, total, owners = dict(held), subscribed, {}
    assert len(plan.outcomes) == len(orders)
    for order, outcome in zip(orders, plan.outcomes):
        try:
            domain.check_subscription(
                product_id="p", asset="BTC", status=status, limits=limits, amount=order.amount,
                user_total=totals.get(order.user_id, Decimal(0)), subscribed=total,
            )
        except FailedPrecondition as refused:
            assert isinstance(outcome, FailedPrecondition) and outcome.message == refused.message
            continue
        assert isinstance(outcome, domain.Placement)
        totals[order.user_id] = totals.get(order.user_id, Decimal(0)) + order.amount
        total += order.amount
        if outcome.existing_id is not None:
            assert kind is domain.Kind.FLEXIBLE and open_flexible[order.user_id] == outcome.existing_id
        else:
            assert plan.new_positions[outcome.new_index] == order.user_id
            owners.setdefault(outcome.new_index, []).append(order)
    assert plan.subscribed == total
    if quota is not None:
        assert total <= max(quota, subscribed)
    assert sorted(owners) == list(range(len(plan.new_positions)))  # every new position carries an order
    if kind is domain.Kind.FLEXIBLE:  # one open position per user: the old one or one new one
        assert len(set(plan.new_positions)) == len(plan.new_positions)
        assert not set(plan.new_positions) & set(open_flexible)
    else:  # a fixed-term Subscribe opens its own
        assert all(len(placed) == 1 for placed in owners.values())


@given(st.sets(st.integers(min_value=1, max_value=2**63 - 1)) | st.sets(st.integers(min_value=1, max_value=5 * domain.CLAIM_BLOCK)))
def test_claim_bitmaps_hold_exactly_the_positions_given(ids: set[int]) -> None:
    maps = domain.claim_bitmaps(sorted(ids, key=str))  # any order
    assert set(maps) == {i // domain.CLAIM_BLOCK for i in ids}
    held = set()
    for block, bits in maps.items():
        assert len(bits) * 8 == domain.CLAIM_BLOCK
        # Bit k counted from the high bit of the first byte, as PostgreSQL's get_bit reads it.
        held |= {block * domain.CLAIM_BLOCK + k for k in range(domain.CLAIM_BLOCK) if bits[k >> 3] & (0x80 >> (k & 7))}
    assert held == ids
