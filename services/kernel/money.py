"""Money: the strict decimal grammar, the asset scale registry, and truncating payouts.

Amounts travel as decimal strings and live as ``Decimal``; never as floats. Accruals are
exact (high precision); a payout is rounded *down* to the asset's scale and the sub-unit
remainder carries to the next period, so over any run the sum paid equals the exact total
rounded down, and no value is created or lost.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_DOWN, Context, Decimal, localcontext
from functools import cache

from services.kernel import columns
from services.kernel.errors import InvalidArgument

# Scales of the assets the platform knows: the number of fraction digits of one unit.
# This is the single registry; a new asset is one line here.
ASSET_SCALES: dict[str, int] = {
    "BTC": 8,
    "ETH": 18,
    "USDT": 6,
    "USDC": 6,
    "BNB": 8,
    "SOL": 9,
    "GT": 8,
    "DOGE": 8,
    "XRP": 6,
    "TON": 9,
}

# Integer digits an amount may have. Columns are NUMERIC(38, 18): 20 integer digits.
MAX_INTEGER_DIGITS = 20

# Context for exact accrual arithmetic: far more digits than any amount x rate product needs.
EXACT = Context(prec=80, rounding=ROUND_DOWN)

_GRAMMAR = re.compile(r"(0|[1-9][0-9]*)(?:\.([0-9]+))?")


def scale_of(asset: str, field: str = "asset") -> int:
    """The scale of a known asset; INVALID_ARGUMENT naming ``field`` otherwise."""
    try:
        return ASSET_SCALES[asset]
    except KeyError:
        raise InvalidArgument(field, f"unknown asset {asset[:32]!r}") from None


def parse_amount(text: str, asset: str, field: str = "amount", *, allow_zero: bool = False) -> Decimal:
    """Parse a decimal string for ``asset`` with the platform's strict grammar.

    Accepted: ``0``, ``12``, ``12.5``, ``0.00000001`` — digits, at most one point with
    digits on both sides, no sign, no exponent, no leading zeros, no whitespace, no more
    fraction digits than the asset's scale, at most MAX_INTEGER_DIGITS integer digits.
    Zero only when ``allow_zero``.
    """
    scale = scale_of(asset)
    return parse_decimal(text, field, scale=scale, allow_zero=allow_zero)


def parse_decimal(text: str, field: str, *, scale: int, allow_zero: bool = False) -> Decimal:
    """The strict grammar of :func:`parse_amount` with an explicit scale (rates, prices)."""
    if not text:
        raise InvalidArgument(field, "is required (a decimal string such as \"1.5\")")
    if len(text) > MAX_INTEGER_DIGITS + 1 + max(scale, 0):
        raise InvalidArgument(field, f"is too long: at most {MAX_INTEGER_DIGITS} integer digits and {scale} fraction digits")
    match = _GRAMMAR.fullmatch(text)
    if match is None:
        raise InvalidArgument(
            field,
            f"{text[:40]!r} is not a plain positive decimal (digits with an optional "
            "fraction; no sign, exponent, spaces, leading zeros, NaN or Infinity)",
        )
    whole, fraction = match.group(1), match.group(2) or ""
    if len(whole) > MAX_INTEGER_DIGITS:
        raise InvalidArgument(field, f"is too large: at most {MAX_INTEGER_DIGITS} integer digits")
    if len(fraction) > scale:
        raise InvalidArgument(field, f"has {len(fraction)} fraction digits; at most {scale} allowed")
    value = Decimal(text)
    if value == 0 and not allow_zero:
        raise InvalidArgument(field, "must be greater than zero")
    return value


@cache
def _amount_column(scale: int) -> re.Pattern[str]:
    """A newline-separated column of amounts > 0 in the grammar of :func:`parse_decimal`."""
    whole = f"[1-9][0-9]{{0,{MAX_INTEGER_DIGITS - 1}}}"
    if scale == 0:
        return columns.pattern(whole)
    fraction = f"[0-9]{{1,{scale}}}"
    return columns.pattern(f"{whole}(?:\\.{fraction})?|0\\.(?=[0-9]*[1-9]){fraction}")


def check_amount_column(values: Sequence[str], asset: str, field: str = "amounts") -> None:
    """Check a column of amounts of ``asset`` (each > 0, the strict grammar, at most the
    asset's scale) in one pass; the first bad one is refused exactly as
    :func:`parse_amount` refuses it, named ``field[i]``. Builds no ``Decimal``."""
    scale = scale_of(asset)
    columns.check(values, _amount_column(scale), lambda value, name: parse_decimal(value, name, scale=scale), field)


def format_amount(value: Decimal) -> str:
    """Canonical wire form: plain notation, no exponent, trailing zeros removed."""
    if not value.is_finite():
        raise ValueError(f"not a finite amount: {value}")
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def truncate(value: Decimal, scale: int) -> Decimal:
    """Round toward zero to ``scale`` fraction digits."""
    with localcontext(EXACT):
        return value.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_DOWN)


@dataclass(frozen=True, slots=True)
class Payout:
    """One period's payout of one position: ``paid`` units go out, ``carry`` stays."""

    paid: Decimal
    carry: Decimal


def payout(accrued: Decimal, carry: Decimal, scale: int) -> Payout:
    """Pay ``accrued + carry`` truncated to ``scale``; the remainder (< one unit) carries.

    ``accrued`` and ``carry`` must be non-negative. Invariant: paid + new carry ==
    accrued + old carry, exactly, and 0 <= new carry < 10**-scale.
    """
    if accrued < 0 or carry < 0:
        raise ValueError("accrued and carry must be non-negative")
    with localcontext(EXACT):
        total = accrued + carry
        paid = truncate(total, scale)
        return Payout(paid=paid, carry=total - paid)
