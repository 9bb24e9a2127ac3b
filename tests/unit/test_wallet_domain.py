"""Wallet rules: balanced transfers, no overdrafts, precise refusals (pure)."""

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.kernel.errors import FailedPrecondition, InsufficientFunds, InvalidArgument
from services.wallet import domain
from services.wallet.domain import AccountKey, HoldState, Kind, Order

ALICE = AccountKey("alice", "BTC", Kind.FUNDING)
BOB = AccountKey("bob", "BTC", Kind.FUNDING)
WORLD = AccountKey("exchange", "BTC", Kind.EXTERNAL)


def _order(src: AccountKey, dst: AccountKey, amount: str) -> Order:
    return Order("BTC", src, dst, Decimal(amount), "")


def test_overdraft_names_account_and_shortfall() -> None:
    with pytest.raises(InsufficientFunds) as err:
        domain.apply({ALICE: Decimal("1")}, [_order(ALICE, BOB, "1.5")])
    assert err.value.message == "insufficient funds in alice/BTC/funding: short by 0.5 BTC"


def test_batch_applies_in_order() -> None:
    balances, applied = domain.apply({}, [_order(WORLD, ALICE, "2"), _order(ALICE, BOB, "2")])
    assert balances == {WORLD: Decimal(-2), ALICE: Decimal(0), BOB: Decimal(2)}
    assert [a.destination_after for a in applied] == [Decimal(2), Decimal(2)]


def test_later_order_failing_fails_the_batch() -> None:
    with pytest.raises(InsufficientFunds):
        domain.apply({}, [_order(WORLD, ALICE, "1"), _order(ALICE, BOB, "1"), _order(ALICE, BOB, "0.1")])


@given(
    st.lists(
        st.tuples(st.sampled_from([ALICE, BOB, WORLD]), st.sampled_from([ALICE, BOB, WORLD]), st.integers(1, 10**9)),
        max_size=40,
    )
)
def test_accepted_histories_sum_to_zero_and_never_overdraw(moves: list[tuple[AccountKey, AccountKey, int]]) -> None:
    balances: dict[AccountKey, Decimal] = {}
    for src, dst, units in moves:
        if src == dst:
            continue
        try:
            balances, _ = domain.apply(balances, [Order("BTC", src, dst, Decimal(units).scaleb(-8), "")])
        except InsufficientFunds:
            continue
        assert sum(balances.values(), Decimal(0)) == 0
        assert all(v >= 0 for k, v in balances.items() if not k.may_go_negative)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(asset="XYZ"), "t.asset"),
        (dict(asset=""), "t.asset"),
        (dict(source=("", Kind.FUNDING)), "t.source.owner"),
        (dict(source=("a b", Kind.FUNDING)), "t.source.owner"),
        (dict(source=("alice", None)), "t.source.kind"),
        (dict(destination=("bob", Kind.HOLD)), "t.destination.kind"),
        (dict(destination=("alice", Kind.FUNDING)), "t.destination"),
        (dict(amount="1.123456789"), "t.amount"),
        (dict(reference="x" * 129), "t.reference"),
    ],
)
def test_order_validation_names_the_field(kwargs: dict, field: str) -> None:
    args = dict(asset="BTC", source=("alice", Kind.FUNDING), destination=("bob", Kind.FUNDING), amount="1", reference="", field="t")
    args.update(kwargs)
    with pytest.raises(InvalidArgument) as err:
        domain.order(**args)
    assert err.value.field == field


def test_hold_settlement_amounts() -> None:
    hold = HoldState(7, "alice", "BTC", Decimal("2"), Decimal("1.5"))
    assert domain.settle_amount(hold, "") == Decimal("1.5")
    assert domain.settle_amount(hold, "0.5") == Decimal("0.5")
    with pytest.raises(FailedPrecondition, match="exceeds the 1.5 BTC that remains held"):
        domain.settle_amount(hold, "2")
    with pytest.raises(FailedPrecondition, match="closed"):
        domain.settle_amount(HoldState(7, "alice", "BTC", Decimal("2"), Decimal(0)), "")


def _payees(n: int, source: AccountKey = AccountKey("simple_earn", "BTC", Kind.EXPENSE)) -> list[Order]:
    return [Order("BTC", source, AccountKey(f"u{i}", "BTC", Kind.FUNDING), Decimal("0.1"), "") for i in range(n)]


def test_bulk_credit_is_one_negative_capable_source_to_distinct_funding_accounts() -> None:
    n = domain.BULK_CREDIT_MIN
    assert domain.bulk_credit_source(_payees(n)) == AccountKey("simple_earn", "BTC", Kind.EXPENSE)
    assert domain.bulk_credit_source(_payees(n - 1)) is None  # small batches take the plain path
    assert domain.bulk_credit_source(_payees(n, ALICE)) is None  # a user's funds could run out
    repeated = _payees(n)
    repeated[-1] = repeated[0]
    assert domain.bulk_credit_source(repeated) is None
    to_treasury = _payees(n)
    to_treasury[3] = Order("BTC", to_treasury[3].source, AccountKey("dual", "BTC", Kind.TREASURY), Decimal(1), "")
    assert domain.bulk_credit_source(to_treasury) is None
