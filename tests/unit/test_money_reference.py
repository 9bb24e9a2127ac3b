"""Issue 8: the decimal parser against a plain reference, for arbitrary text (pure).

test_money.py checks examples and that parse_amount never crashes; test_columns.py that
the amount column agrees with parse_amount over a small alphabet. Here:

- parse_decimal / parse_amount against a reference written without regular expressions:
  for any text, any scale 0..20 and either zero rule, the result is exactly
  ``Decimal(text)`` (same digits and exponent, a Decimal, never a float) when the text is
  in the grammar, and otherwise InvalidArgument naming the field, never another
  exception, with a bounded message even for 10 KB of input;
- the fast column paths (money's amount column at every scale, the wallet's owner and
  reference columns, Simple Earn's payout columns) accept no value the per-value rule
  refuses, and refuse with the per-value message, for arbitrary text including newlines.
"""

from __future__ import annotations

import string
from decimal import Decimal

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.kernel import columns, money
from services.kernel.errors import InvalidArgument
from services.kernel.money import ASSET_SCALES, MAX_INTEGER_DIGITS, check_amount_column, parse_amount, parse_decimal
from services.simple_earn import domain as earn_domain
from services.wallet import domain as wallet_domain

DIGITS = "0123456789"


def reference(text: str, scale: int, allow_zero: bool) -> Decimal | None:
    """The grammar, spelled out: ASCII digits, at most one point with digits on both
    sides, no leading zero, at most MAX_INTEGER_DIGITS integer and ``scale`` fraction
    digits, > 0 unless ``allow_zero``. None: refused."""
    if not text or any(ch not in DIGITS + "." for ch in text):
        return None
    whole, point, fraction = text.partition(".")
    if not whole or (point and not fraction) or "." in fraction:
        return None
    if len(whole) > 1 and whole[0] == "0":
        return None
    if len(whole) > MAX_INTEGER_DIGITS or len(fraction) > scale:
        return None
    value = Decimal(text)
    if value == 0 and not allow_zero:
        return None
    return value


EDGES = [
    "", " ", "0", "00", "0.0", "0.", ".0", "1", "1.", ".1", "01", "1.0", "1.00", "-0", "-1", "+1", "1e5", "1E5", "1e-5", "NaN", "nan",
    "sNaN", "Infinity", "-Infinity", "inf", "1_000", "1,5", "1.5.5", "١", "１", "²", "1\n", "\n1", "1 ", " 1", "\t1", "0x10",
    "9" * 20, "9" * 21, "1" + "0" * 20, "0." + "0" * 18, "0." + "0" * 17 + "1", "9" * 20 + "." + "9" * 18, "1" * 10_240,
]
grammar_like = st.builds(
    lambda sign, whole, point, fraction: f"{sign}{whole}{point}{fraction}",
    st.sampled_from(["", "", "", "-", "+", " ", "0"]),
    st.text(DIGITS, max_size=23),
    st.sampled_from(["", ".", "."]),
    st.text(DIGITS, max_size=21),
)
any_text = st.one_of(
    st.sampled_from(EDGES),
    grammar_like,
    st.text(DIGITS + ".-+eE \n_", max_size=30),
    st.text(max_size=30),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.decimals(min_value=0, max_value=10**20, places=18, allow_nan=False).map(lambda d: format(d, "f")),
    st.floats().map(repr),
)


@settings(max_examples=400)
@given(any_text, st.integers(0, 20), st.booleans())
@example("1.5", 1, False)
@example("0", 0, True)
@example("0.000", 3, True)
def test_parse_decimal_is_the_reference(text: str, scale: int, allow_zero: bool) -> None:
    expected = reference(text, scale, allow_zero)
    try:
        value = parse_decimal(text, "rate", scale=scale, allow_zero=allow_zero)
    except InvalidArgument as err:
        assert expected is None, f"{text!r} refused: {err.message}"
        assert err.field == "rate"
        assert err.message.startswith("rate: ")
        assert len(err.message) < 300  # the input is echoed truncated
        return
    assert expected is not None, f"{text!r} accepted as {value!r}"
    assert type(value) is Decimal  # never a float, never a subclass
    assert value.is_finite()
    assert value.as_tuple() == Decimal(text).as_tuple() == expected.as_tuple()  # exactly Decimal(text), exponent included


@given(any_text, st.sampled_from(sorted(ASSET_SCALES)))
def test_parse_amount_is_the_reference_at_the_assets_scale(text: str, asset: str) -> None:
    expected = reference(text, ASSET_SCALES[asset], allow_zero=False)
    try:
        value = parse_amount(text, asset, "transfer.amount")
    except InvalidArgument as err:
        assert expected is None, f"{text!r} refused: {err.message}"
        assert err.field == "transfer.amount"
        return
    assert expected is not None and type(value) is Decimal and value.as_tuple() == expected.as_tuple()


@given(st.text(max_size=12).filter(lambda a: a not in ASSET_SCALES), any_text)
def test_an_unknown_asset_is_refused_naming_the_asset_field(asset: str, text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_amount(text, asset, "amount")
    assert err.value.field == "asset"
    assert len(err.value.message) < 200


# ---- columns ------------------------------------------------------------------------

column_values = st.lists(st.one_of(any_text.filter(lambda t: len(t) < 100), st.sampled_from(["1", "0.5", "2.25", "10"])), max_size=10)


def first_refusal(values: list[str], check_one, field: str) -> str | None:  # type: ignore[no-untyped-def]
    for i, value in enumerate(values):
        try:
            check_one(value, f"{field}[{i}]")
        except InvalidArgument as err:
            return err.message
    return None


@settings(max_examples=300)
@given(column_values, st.integers(0, 20))
def test_the_amount_column_agrees_with_parse_decimal_at_every_scale(values: list[str], scale: int) -> None:
    def one(value: str, name: str) -> Decimal:
        return parse_decimal(value, name, scale=scale)

    pattern = money._amount_column(scale)  # noqa: SLF001 - the fast path itself
    joined = "\n".join(values)
    if values and joined.count("\n") == len(values) - 1 and pattern.fullmatch(joined):
        assert first_refusal(values, one, "amounts") is None, values  # the fast path accepts nothing the rule refuses
    expected = first_refusal(values, one, "amounts")
    try:
        columns.check(values, pattern, one, "amounts")
    except InvalidArgument as err:
        assert err.message == expected
    else:
        assert expected is None


@given(column_values, st.sampled_from(sorted(ASSET_SCALES)))
def test_check_amount_column_agrees_with_parse_amount_for_any_text(values: list[str], asset: str) -> None:
    expected = first_refusal(values, lambda v, n: parse_amount(v, asset, n), "amounts")
    try:
        check_amount_column(values, asset, "amounts")
    except InvalidArgument as err:
        assert err.message == expected
    else:
        assert expected is None


names = st.one_of(st.text(string.ascii_letters + string.digits + "_.:@- \n/", max_size=70), st.text(max_size=8), st.sampled_from(["a", "a" * 64, "a" * 65, "-a"]))


@given(st.lists(names, max_size=8))
def test_the_owner_and_reference_columns_agree_with_the_per_value_rules(values: list[str]) -> None:
    for pattern, one, field in (
        (wallet_domain._NAME_COLUMN, wallet_domain.check_name, "owners"),  # noqa: SLF001
        (wallet_domain._REFERENCE_COLUMN, wallet_domain.check_reference, "references"),  # noqa: SLF001
    ):
        expected = first_refusal(values, one, field)
        try:
            columns.check(values, pattern, one, field)
        except InvalidArgument as err:
            assert err.message == expected
        else:
            assert expected is None


@settings(max_examples=300)
@given(column_values, st.sampled_from(sorted(ASSET_SCALES)))
def test_payout_amount_columns_keep_exactly_what_parse_amount_accepts(amounts: list[str], asset: str) -> None:
    """Simple Earn checks payout amounts with its own line pattern: it must agree with the
    strict grammar item by item, also when the whole column is matched at once."""
    n = len(amounts)
    checked = earn_domain.check_payout_columns([str(i + 1) for i in range(n)], ["u"] * n, amounts, asset)
    refused = {i for i, value in enumerate(amounts) if reference(value, ASSET_SCALES[asset], allow_zero=False) is None}
    assert set(checked.problems) == refused, (amounts, checked.problems)
