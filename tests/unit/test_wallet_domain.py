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


def test_batch_is_a_bulk_credit_when_one_negative_capable_source_credits_distinct_funding_accounts() -> None:
    n = domain.BULK_CREDIT_MIN
    bulk = domain.as_bulk_credit(_payees(n))
    assert bulk is not None
    assert bulk.source == AccountKey("simple_earn", "BTC", Kind.EXPENSE)
    assert bulk.owners == [f"u{i}" for i in range(n)] and bulk.amounts == ["0.1"] * n and bulk.references == []
    assert domain.as_bulk_credit(_payees(n - 1)) is None  # small batches take the plain path
    assert domain.as_bulk_credit(_payees(n, ALICE)) is None  # a user's funds could run out
    repeated = _payees(n)
    repeated[-1] = repeated[0]
    assert domain.as_bulk_credit(repeated) is None
    to_treasury = _payees(n)
    to_treasury[3] = Order("BTC", to_treasury[3].source, AccountKey("dual", "BTC", Kind.TREASURY), Decimal(1), "")
    assert domain.as_bulk_credit(to_treasury) is None


# ---- bulk credits in columns -------------------------------------------------------------

EXPENSE = ("simple_earn", Kind.EXPENSE)
name_text = st.one_of(
    st.sampled_from(["alice", "bob", "u-1", "a.b:c@d_e", "x" * 64, "x" * 65, "", "-x", "_x", "a b", "a\nb", "é", "a\n", "\n"]),
    st.text("ab1_.:@- \n", max_size=8),
)


def _bulk(**kwargs):  # type: ignore[no-untyped-def]
    args = dict(asset="USDT", source=EXPENSE, owners=["alice", "bob"], amounts=["1", "0.5"], references=[], reference="")
    args.update(kwargs)
    return domain.bulk_credit(**args)


def _first_refusal(owners: list[str], amounts: list[str]) -> str | None:
    """The rule, one credit at a time: the first bad owner, then the first repeated one,
    then the first bad amount."""
    for i, owner in enumerate(owners):
        try:
            domain.check_name(owner, f"owners[{i}]")
        except InvalidArgument as err:
            return err.message
    for i, owner in enumerate(owners):
        if owner in owners[:i]:
            return f"owners[{i}]: {owner!r} is already credited at owners[{owners.index(owner)}]: owners must be distinct"
    for i, amount in enumerate(amounts):
        try:
            domain.parse_amount(amount, "USDT", f"amounts[{i}]")
        except InvalidArgument as err:
            return err.message
    return None


@given(st.lists(st.tuples(name_text, st.sampled_from(["1", "0.000001", "0", "1.0000001", "7.5", "x"])), min_size=1, max_size=10))
def test_bulk_credit_columns_refuse_exactly_what_single_credits_refuse(credits: list[tuple[str, str]]) -> None:
    owners, amounts = [c[0] for c in credits], [c[1] for c in credits]
    expected = _first_refusal(owners, amounts)
    try:
        bulk = _bulk(owners=owners, amounts=amounts)
    except InvalidArgument as err:
        assert err.message == expected
    else:
        assert expected is None
        assert (bulk.owners, bulk.amounts, bulk.source) == (owners, amounts, AccountKey("simple_earn", "USDT", Kind.EXPENSE))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(asset="NOPE"), "asset: unknown asset 'NOPE'"),
        (dict(asset=""), "asset: is required"),
        (dict(source=("", Kind.EXPENSE)), "source.owner: is required"),
        (dict(source=("simple_earn", None)), "source.kind: is required"),
        (dict(source=("simple_earn", Kind.FUNDING)), "source.kind: must be an account that may go negative (expense or external); a funding account may not"),
        (dict(source=("pool", Kind.REWARD_POOL)), "source.kind: must be an account that may go negative (expense or external); a reward_pool account may not"),
        (dict(owners=[], amounts=[]), "owners: must hold at least one owner"),
        (dict(owners=[f"u{i}" for i in range(10_001)], amounts=["1"] * 10_001), "owners: at most 10000 credits per request; got 10001"),
        (dict(amounts=["1"]), "amounts: has 1 entries for 2 owners: one amount per owner"),
        (dict(references=["r"]), "references: has 1 entries for 2 owners: one per owner, or none (then reference applies to each)"),
        (dict(owners=["alice", "alice"]), "owners[1]: 'alice' is already credited at owners[0]: owners must be distinct"),
        (dict(amounts=["1", "0.0000001"]), "amounts[1]: has 7 fraction digits; at most 6 allowed"),
        (dict(references=["ok", "\x07"]), "references[1]: must be at most 128 printable ASCII characters"),
        (dict(reference="x" * 129), "reference: must be at most 128 printable ASCII characters"),
    ],
)
def test_bulk_credit_refusals_name_field_and_rule(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        _bulk(**kwargs)
    assert err.value.message == message


def test_bulk_credit_reference_column() -> None:
    assert _bulk(reference="payout:1").reference_column() == ["payout:1", "payout:1"]
    assert _bulk(references=["a", "b"], reference="ignored").reference_column() == ["a", "b"]
