"""Column checks (kernel.columns, money.check_amount_column): the one-pass fast path
accepts exactly what the per-value rule accepts, and refuses with its message (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.kernel.errors import InvalidArgument
from services.kernel.money import ASSET_SCALES, check_amount_column, parse_amount

EDGES = ["0", "0.0", "0.000000", "1", "1.0", "01", "1.", ".5", "-1", "+1", "1e3", "NaN", "Infinity", " 1", "1 ", "1\n2",
         "", "0.000001", "0.0000001", "9" * 20, "9" * 21, "1" * 20 + ".5", "١", "1.5\n", "\n", "0.10", "10.000000"]
amount_text = st.one_of(
    st.sampled_from(EDGES),
    st.builds(lambda whole, frac: f"{whole}.{frac}" if frac else str(whole), st.integers(0, 10**21), st.text("0123456789", max_size=10)),
    st.text("0123456789.-+eE \n", max_size=24),
)


def per_value(values: list[str], asset: str, field: str) -> str | None:
    """The reference: the message of the first value parse_amount refuses, or None."""
    for i, value in enumerate(values):
        try:
            parse_amount(value, asset, f"{field}[{i}]")
        except InvalidArgument as err:
            return err.message
    return None


@given(st.lists(amount_text, max_size=12), st.sampled_from(sorted(ASSET_SCALES)))
def test_amount_column_agrees_with_parse_amount(values: list[str], asset: str) -> None:
    expected = per_value(values, asset, "amounts")
    try:
        check_amount_column(values, asset, "amounts")
    except InvalidArgument as err:
        assert err.message == expected
    else:
        assert expected is None


@given(st.lists(st.integers(1, 10**26), min_size=1, max_size=50), st.sampled_from(sorted(ASSET_SCALES)))
def test_valid_amounts_take_the_fast_path(units: list[int], asset: str) -> None:
    scale = ASSET_SCALES[asset]
    values = []
    for u in units:
        whole, frac = divmod(u, 10**scale)
        whole %= 10**20
        values.append(f"{whole}.{frac:0{scale}d}" if frac else str(whole or 1))
    from services.kernel import money

    assert money._amount_column(scale).fullmatch("\n".join(values))  # noqa: SLF001 - the fast path itself
    check_amount_column(values, asset)


@pytest.mark.parametrize(
    "values,message",
    [
        (["1", "2", "0"], "amounts[2]: must be greater than zero"),
        (["1", "0.1234567"], "amounts[1]: has 7 fraction digits; at most 6 allowed"),
        (["1e3"], "amounts[0]: '1e3' is not a plain positive decimal (digits with an optional fraction; no sign, exponent, spaces, leading zeros, NaN or Infinity)"),
        (["1\n2", "3"], "amounts[0]: '1\\n2' is not a plain positive decimal (digits with an optional fraction; no sign, exponent, spaces, leading zeros, NaN or Infinity)"),
        (["5", ""], 'amounts[1]: is required (a decimal string such as "1.5")'),
    ],
)
def test_amount_column_names_the_first_bad_index(values: list[str], message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_amount_column(values, "USDT")
    assert err.value.message == message
