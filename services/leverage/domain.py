"""Smart Leverage rules, pure: products, quotes, the breakeven price and the payoff.

PRODUCT_RULES.md, exactly:
- a quote gives an entry price P0 within 5% of the index and a breakeven price B, long
  above P0, short below it, the gap being the product's fee; valid for a few seconds;
- settlement price S = the average index over the 30 minutes before maturity (the TWAP
  from the market service), or the current index for an early redemption;
- long payoff = max(0, I + I x L x (S - B) / B), short payoff = max(0, I + I x L x (B - S) / B).

Choices (README, "Smart Leverage"):
- P0 is the index at quote time (0% from it); at subscription the current index must
  still be within 5% of P0, else the quote is refused (re-quote);
- B = P0 x (1 + fee) for long, rounded up to the price scale; P0 x (1 - fee) for short,
  rounded down: the rounding never favours the user;
- the payoff is exact (fractions), floored at zero, truncated to the asset's scale; the
  payout is the payoff capped at what the product's treasury account holds when paid.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from fractions import Fraction

from services.kernel.errors import FailedPrecondition, InvalidArgument
from services.kernel.ids import check_id, check_user_id
from services.kernel.money import format_amount

HOUR_US = 3_600 * 1_000_000
LEVERAGE_SCALE = 2
FEE_SCALE = 6
MAX_LEVERAGE = Decimal(100)
MAX_FEE = Decimal("0.05")
MAX_ENTRY_DEVIATION = Fraction(5, 100)  # the entry price stays within 5% of the index
DEFAULT_TERM_HOURS = 720
MAX_TERM_HOURS = 366 * 24
DEFAULT_WINDOW_SECONDS = 1800
MIN_WINDOW_SECONDS = 60
MAX_WINDOW_SECONDS = 86_400


class Direction(str, Enum):
    LONG = "long"
    SHORT = "short"


class Status(str, Enum):
    OPEN = "open"
    SETTLING = "settling"
    SETTLED = "settled"
    FAILED = "failed"


class CloseKind(str, Enum):
    MATURITY = "maturity"
    EARLY = "early"


def treasury_owner(product_id: str) -> str:
    """The wallet owner of the product's treasury (64 characters at most, as the wallet wants)."""
    return f"leverage.{product_id}"[:64]


@dataclass(frozen=True, slots=True)
class Product:
    product_id: str
    base: str
    quote: str
    max_leverage: Decimal
    fee_rate: Decimal
    min_principal: Decimal
    max_principal: Decimal
    max_term_hours: int
    window_seconds: int

    @property
    def pair(self) -> str:
        return f"{self.base}/{self.quote}"


def check_product(max_leverage: Decimal, fee_rate: Decimal, min_principal: Decimal, max_principal: Decimal) -> None:
    if max_leverage < 1 or max_leverage > MAX_LEVERAGE:
        raise InvalidArgument("max_leverage", f"must be 1 to {MAX_LEVERAGE}")
    if fee_rate > MAX_FEE:
        raise InvalidArgument("fee_rate", f"at most {MAX_FEE} (a fraction: 0.005 is 0.5%)")
    if max_principal < min_principal:
        raise InvalidArgument("max_principal", "must be at least min_principal")


def check_leverage(product: Product, leverage: Decimal) -> None:
    if leverage < 1:
        raise InvalidArgument("leverage", "must be at least 1")
    if leverage > product.max_leverage:
        raise InvalidArgument("leverage", f"at most the product's maximum of {format_amount(product.max_leverage)}")


def check_principal(product: Product, principal: Decimal) -> None:
    if principal < product.min_principal:
        raise FailedPrecondition(f"principal: below the product's minimum of {format_amount(product.min_principal)} {product.quote}")
    if principal > product.max_principal:
        raise FailedPrecondition(f"principal: over the product's maximum of {format_amount(product.max_principal)} {product.quote}")


def check_maturity(product: Product, maturity_us: int, now_us: int) -> None:
    if maturity_us % HOUR_US:
        raise InvalidArgument("maturity", "must be a full UTC hour (minutes, seconds and nanos zero)")
    if maturity_us - product.window_seconds * 1_000_000 <= now_us:
        raise InvalidArgument("maturity", "must be after now plus the settlement window (the window starts after the subscription)")
    if maturity_us - now_us > product.max_term_hours * HOUR_US:
        raise InvalidArgument("maturity", f"must be at most {product.max_term_hours} hours from now")


def ceil_to(value: Fraction, scale: int) -> Decimal:
    scaled = value * 10**scale
    return Decimal(-((-scaled.numerator) // scaled.denominator)).scaleb(-scale)


def floor_to(value: Fraction, scale: int) -> Decimal:
    scaled = value * 10**scale
    return Decimal(scaled.numerator // scaled.denominator).scaleb(-scale)


def breakeven(direction: Direction, entry: Decimal, fee_rate: Decimal, price_scale: int) -> Decimal:
    """Long: P0 x (1 + fee) rounded up; short: P0 x (1 - fee) rounded down (to the price scale)."""
    p0, fee = Fraction(entry), Fraction(fee_rate)
    if direction is Direction.LONG:
        return ceil_to(p0 * (1 + fee), price_scale)
    return floor_to(p0 * (1 - fee), price_scale)


def within_entry_band(entry: Decimal, index: Decimal) -> bool:
    """|P0 - index| <= 5% of the index."""
    return abs(Fraction(entry) - Fraction(index)) <= MAX_ENTRY_DEVIATION * Fraction(index)


def payoff_exact(direction: Direction, principal: Decimal, leverage: Decimal, breakeven_price: Decimal, price: Decimal) -> Fraction:
    """max(0, I + I x L x (S - B) / B) long; max(0, I + I x L x (B - S) / B) short."""
    i, lev, b, s = Fraction(principal), Fraction(leverage), Fraction(breakeven_price), Fraction(price)
    move = (s - b) if direction is Direction.LONG else (b - s)
    return max(Fraction(0), i + i * lev * move / b)


def payoff(direction: Direction, principal: Decimal, leverage: Decimal, breakeven_price: Decimal, price: Decimal, scale: int) -> Decimal:
    """The payoff truncated to the asset's scale (the remainder stays in the treasury)."""
    return floor_to(payoff_exact(direction, principal, leverage, breakeven_price, price), scale)


def capped(amount: Decimal, treasury_balance: Decimal) -> Decimal:
    """What is paid: the payoff, never more than the treasury holds, never below zero."""
    return max(Decimal(0), min(amount, treasury_balance))


def notional(principal: Decimal, leverage: Decimal) -> Decimal:
    """The exposure a position adds: I x L, in the quote asset."""
    return principal * leverage
