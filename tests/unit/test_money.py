"""The strict decimal grammar and truncating payouts (pure; property-tested)."""

from decimal import Decimal, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.kernel.errors import InvalidArgument
from services.kernel.money import ASSET_SCALES, EXACT, format_amount, parse_amount, payout, truncate


@pytest.mark.parametrize("text,expected", [("1", "1"), ("0.5", "0.5"), ("12.00000001", "12.00000001"), ("100", "100")])
def test_accepts_plain_decimals(text: str, expected: str) -> None:
    assert parse_amount(text, "BTC") == Decimal(expected)


@pytest.mark.parametrize(
    "text,rule",
    [
        ("", "is required"),
        ("-1", "not a plain positive decimal"),
        ("+1", "not a plain positive decimal"),
        ("1e5", "not a plain positive decimal"),
        ("1E-3", "not a plain positive decimal"),
        ("NaN", "not a plain positive decimal"),
        ("Infinity", "not a plain positive decimal"),
        (" 1", "not a plain positive decimal"),
        ("1 ", "not a plain positive decimal"),
        (".5", "not a plain positive decimal"),
        ("5.", "not a plain positive decimal"),
        ("01", "not a plain positive decimal"),
        ("1,5", "not a plain positive decimal"),
        ("0", "must be greater than zero"),
        ("0.000", "must be greater than zero"),
        ("0.000000001", "fraction digits; at most 8"),
        ("1" * 21, "at most 20 integer digits"),
        ("9" * 200, "too long"),
        ("١٢", "not a plain positive decimal"),  # non-ASCII digits
    ],
)
def test_refuses_everything_else_naming_the_field(text: str, rule: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_amount(text, "BTC", "transfer.amount")
    assert err.value.field == "transfer.amount"
    assert rule in err.value.message


def test_unknown_asset_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="unknown asset"):
        parse_amount("1", "NOPE")


def test_zero_when_allowed() -> None:
    assert parse_amount("0", "USDT", allow_zero=True) == 0


@given(st.text(max_size=40))
def test_parser_never_crashes_and_only_accepts_canonical_numbers(text: str) -> None:
    try:
        value = parse_amount(text, "ETH")
    except InvalidArgument:
        return
    assert value > 0
    assert value.is_finite()
    assert -value.as_tuple().exponent <= ASSET_SCALES["ETH"]


@given(st.decimals(min_value=0, max_value=10**12, allow_nan=False, allow_infinity=False, places=18))
def test_format_parse_round_trip(value: Decimal) -> None:
    text = format_amount(value)
    assert "E" not in text and "e" not in text
    assert parse_amount(text, "ETH", allow_zero=True) == value


@given(
    st.lists(st.decimals(min_value=0, max_value=1000, places=30, allow_nan=False, allow_infinity=False), max_size=60),
    st.sampled_from(sorted(ASSET_SCALES)),
)
def test_payouts_with_carry_pay_exactly_the_total_truncated(accruals: list[Decimal], asset: str) -> None:
    scale = ASSET_SCALES[asset]
    with localcontext(EXACT):
        _check_carry(accruals, scale)


def _check_carry(accruals: list[Decimal], scale: int) -> None:
    carry = Decimal(0)
    paid = Decimal(0)
    for accrued in accruals:
        result = payout(accrued, carry, scale)
        assert result.paid == truncate(result.paid, scale)
        assert 0 <= result.carry < Decimal(1).scaleb(-scale)
        paid += result.paid
        carry = result.carry
    exact = sum(accruals, Decimal(0))
    assert paid == truncate(exact, scale)
    assert paid + carry == exact
