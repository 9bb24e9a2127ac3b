"""Market rules, pure: pairs, prices, the time-weighted average and what "missing" means.

Time is integer microseconds since the epoch. The price in force at an instant t is the
price of the last tick at or before t. The TWAP over [start, end) is the integral of that
step function divided by (end - start), computed exactly (``Fraction``) and rounded half
even to the quote asset's scale.

Missing data, precisely: the *age* of the price at t is t minus the time of the tick in
force. A window is complete iff the age stays at most ``max_gap`` at every instant of
[start, end): there is a tick at or before ``start``, consecutive ticks (from the one in
force at ``start``) are at most ``max_gap`` apart, and the last tick is at most
``max_gap`` before ``end``. Otherwise the first interval where the age exceeds
``max_gap`` is the gap that the refusal names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from services.kernel.clock import micros as micros
from services.kernel.errors import FailedPrecondition, InvalidArgument
from services.kernel.money import format_amount, parse_decimal, scale_of

_PAIR = re.compile(r"([A-Z0-9]{1,16})/([A-Z0-9]{1,16})")
_SOURCE = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,31}")
US = 1_000_000
MAX_WINDOW_US = 7 * 24 * 3600 * US
MAX_BACKFILL = 10_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Pair:
    base: str
    quote: str

    @property
    def name(self) -> str:
        return f"{self.base}/{self.quote}"

    @property
    def price_scale(self) -> int:
        """A price is an amount of the quote asset per unit of base: the quote's scale."""
        return scale_of(self.quote)


def parse_pair(text: str, field: str = "pair") -> Pair:
    if not text:
        raise InvalidArgument(field, 'is required ("BASE/QUOTE", e.g. "BTC/USDT")')
    match = _PAIR.fullmatch(text)
    if match is None:
        raise InvalidArgument(field, f'{text[:40]!r} is not "BASE/QUOTE" of upper-case asset codes (e.g. "BTC/USDT")')
    base, quote = match.groups()
    scale_of(base, field)
    scale_of(quote, field)
    if base == quote:
        raise InvalidArgument(field, "base and quote must differ")
    return Pair(base, quote)


def parse_price(text: str, pair: Pair, field: str = "price") -> Decimal:
    return parse_decimal(text, field, scale=pair.price_scale)


def check_source(text: str, field: str = "source") -> str:
    if not _SOURCE.fullmatch(text):
        raise InvalidArgument(field, "must be 1 to 32 characters of lower-case letters, digits and _ . : - (starting with a letter or digit)")
    return text


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def iso(value: int) -> str:
    return from_micros(value).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Tick:
    at_us: int
    price: Decimal


@dataclass(frozen=True, slots=True)
class Twap:
    price: Decimal  # rounded half even to the pair's price scale
    exact: Fraction
    ticks: int
    first_us: int
    last_us: int
    max_age_us: int


def check_window(start_us: int, end_us: int) -> None:
    if end_us <= start_us:
        raise InvalidArgument("end", "must be after start")
    if end_us - start_us > MAX_WINDOW_US:
        raise InvalidArgument("end", f"the window may be at most {MAX_WINDOW_US // (3600 * US)} hours long")


def round_price(value: Fraction, scale: int) -> Decimal:
    """Round half even to ``scale`` fraction digits, exactly (``round`` of a Fraction is half even)."""
    return Decimal(round(value * 10**scale)).scaleb(-scale)


def twap(pair: Pair, ticks: Sequence[Tick], start_us: int, end_us: int, max_gap_us: int) -> Twap:
    """The TWAP over [start_us, end_us) of ``ticks``: the tick in force at ``start_us``
    (the last at or before it) followed by the ticks inside the window, in time order.
    Raises FailedPrecondition naming the first gap when the window is not complete."""
    check_window(start_us, end_us)
    name = pair.name
    if not ticks or ticks[0].at_us > start_us:
        upto = ticks[0].at_us if ticks else end_us
        raise FailedPrecondition(
            f"prices missing for {name}: no tick at or before the window start {iso(start_us)}"
            f" (the first is {'at ' + iso(ticks[0].at_us) if ticks else 'none in the window'}); no index from {iso(start_us)} to {iso(upto)}"
        )
    for a, b in zip(ticks, ticks[1:]):
        if b.at_us <= a.at_us:
            raise ValueError("ticks must be in strictly increasing time order")
        if b.at_us > end_us:
            raise ValueError("a tick after the window end")
    times = [t.at_us for t in ticks] + [end_us]
    max_age = 0
    for i, (a, b) in enumerate(zip(times, times[1:])):
        age = b - a
        if age > max_gap_us:
            lo = max(a + max_gap_us, start_us)
            raise FailedPrecondition(
                f"prices missing for {name}: no tick between {iso(a)} and {iso(b)}"
                f" ({age / US:g} s > the maximum gap of {max_gap_us / US:g} s); the window"
                f" [{iso(start_us)}, {iso(end_us)}) has no fresh index from {iso(lo)} to {iso(b)}"
            )
        max_age = max(max_age, age)
    total = Fraction(0)
    for i, tick in enumerate(ticks):
        lo = max(tick.at_us, start_us)
        hi = times[i + 1]
        if hi > lo:
            total += Fraction(tick.price) * (hi - lo)
    exact = total / (end_us - start_us)
    return Twap(round_price(exact, pair.price_scale), exact, len(ticks), ticks[0].at_us, ticks[-1].at_us, max_age)


def display(value: Decimal) -> str:
    return format_amount(value)
