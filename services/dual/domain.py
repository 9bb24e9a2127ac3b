"""Dual Investment rules, pure: plans, subscription limits and the settlement formulas.

PRODUCT_RULES.md, exactly:
- yield factor y = APR x d / 365, d = the exact days from subscription to settlement
  (elapsed microseconds / 86,400,000,000, i.e. hours / 24 with the fraction of the hour);
- settlement price S = the TWAP of the index over the window before the settlement time
  (default 30 minutes), from the market service;
- sell-high, principal P in base: S >= K -> P x K x (1 + y) in quote, else P x (1 + y) in base;
- buy-low, principal P in quote: S <= K -> P / K x (1 + y) in base, else P x (1 + y) in quote.

Every amount is computed with exact rationals and truncated (rounded down) to the payout
asset's scale; the sub-unit remainder stays in the product's treasury.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from fractions import Fraction

from services.kernel.errors import FailedPrecondition, InvalidArgument
from services.kernel.ids import check_id, check_printable, check_user_id
from services.kernel.money import format_amount, scale_of

DAY_US = 86_400 * 1_000_000
HOUR_US = 3_600 * 1_000_000
APR_SCALE = 6
DEFAULT_WINDOW_SECONDS = 1800
MIN_WINDOW_SECONDS = 60
MAX_WINDOW_SECONDS = 86_400
MAX_TERM_DAYS = 366
TREASURY_OWNER = "dual"


class Direction(str, Enum):
    SELL_HIGH = "sell_high"
    BUY_LOW = "buy_low"


class PlanStatus(str, Enum):
    OPEN = "open"
    CLOSED = "closed"
    SETTLING = "settling"
    SETTLED = "settled"
    FAILED = "failed"


class SubscriptionStatus(str, Enum):
    SUBSCRIBED = "subscribed"
    SETTLING = "settling"
    SETTLED = "settled"
    FAILED = "failed"


def check_order_id(value: str, field: str = "client_order_id") -> str:
    return check_printable(value, field, 64)


@dataclass(frozen=True, slots=True)
class Plan:
    plan_id: str
    base: str
    quote: str
    direction: Direction
    strike: Decimal
    apr: Decimal
    settle_us: int
    window_seconds: int
    min_amount: Decimal
    max_per_user: Decimal
    quota: Decimal

    @property
    def invest_asset(self) -> str:
        return self.base if self.direction is Direction.SELL_HIGH else self.quote

    @property
    def pair(self) -> str:
        return f"{self.base}/{self.quote}"

    @property
    def closes_us(self) -> int:
        """Subscriptions close when the settlement window starts."""
        return self.settle_us - self.window_seconds * 1_000_000


def check_limits(min_amount: Decimal, max_per_user: Decimal, quota: Decimal) -> None:
    if max_per_user < min_amount:
        raise InvalidArgument("max_per_user", "must be at least min_amount")
    if quota < min_amount:
        raise InvalidArgument("quota", "must be at least min_amount")


def check_settlement(settle_us: int, window_seconds: int, now_us: int) -> None:
    if settle_us % HOUR_US:
        raise InvalidArgument("settlement_time", "must be a full UTC hour (minutes, seconds and nanos zero)")
    if settle_us - window_seconds * 1_000_000 <= now_us:
        raise InvalidArgument("settlement_time", "must be after now plus the settlement window (subscriptions close when the window starts)")
    if settle_us - now_us > MAX_TERM_DAYS * DAY_US:
        raise InvalidArgument("settlement_time", f"must be at most {MAX_TERM_DAYS} days from now")


def check_subscription(plan: Plan, amount: Decimal, user_total: Decimal, subscribed: Decimal, now_us: int) -> None:
    """The preconditions of a subscription (FAILED_PRECONDITION, naming the rule)."""
    asset = plan.invest_asset
    if now_us >= plan.closes_us:
        raise FailedPrecondition(f"plan_id: plan {plan.plan_id} is closed for subscriptions (its settlement window has started)")
    if amount < plan.min_amount:
        raise FailedPrecondition(f"amount: below the plan's minimum of {format_amount(plan.min_amount)} {asset}")
    if user_total + amount > plan.max_per_user:
        raise FailedPrecondition(
            f"amount: over the per-user maximum of {format_amount(plan.max_per_user)} {asset}"
            f" ({format_amount(user_total)} subscribed already)"
        )
    if subscribed + amount > plan.quota:
        raise FailedPrecondition(f"amount: over the plan's quota: {format_amount(max(plan.quota - subscribed, Decimal(0)))} {asset} left")


def yield_factor(apr: Decimal, subscribed_us: int, settle_us: int) -> Fraction:
    """y = APR x d / 365, d = exact days from subscription to settlement."""
    if settle_us < subscribed_us:
        raise ValueError("subscribed after the settlement time")
    return Fraction(apr) * Fraction(settle_us - subscribed_us, DAY_US) / 365


@dataclass(frozen=True, slots=True)
class Payout:
    converted: bool
    asset: str
    amount: Decimal  # truncated to the asset's scale
    exact: Fraction


def floor_to(value: Fraction, scale: int) -> Decimal:
    scaled = value * 10**scale
    return Decimal(scaled.numerator // scaled.denominator).scaleb(-scale)


def settle(plan: Plan, principal: Decimal, subscribed_us: int, price: Decimal) -> Payout:
    """What a subscription of ``principal`` receives at settlement price ``price``."""
    y = yield_factor(plan.apr, subscribed_us, plan.settle_us)
    p, k, s = Fraction(principal), Fraction(plan.strike), Fraction(price)
    if plan.direction is Direction.SELL_HIGH:
        converted = s >= k
        asset, exact = (plan.quote, p * k * (1 + y)) if converted else (plan.base, p * (1 + y))
    else:
        converted = s <= k
        asset, exact = (plan.base, p / k * (1 + y)) if converted else (plan.quote, p * (1 + y))
    return Payout(converted, asset, floor_to(exact, scale_of(asset)), exact)
