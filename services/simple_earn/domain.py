"""Simple Earn rules as pure functions: tiers, hours, limits, redemption split, maturity.

No I/O, no asyncio, no protobuf. Amounts are ``Decimal``; hours are unix hours
(seconds since the epoch // 3600). APR is a yearly simple rate as a fraction; an hourly
rate is APR / 8760.

Tiered APR works like income tax: with tiers [0, 5) at 8% and [5, inf) at 3%, a
principal of 7 earns 5 x 8% + 2 x 3%.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from enum import StrEnum

from services.kernel.errors import FailedPrecondition, InvalidArgument
from services.kernel.money import EXACT, format_amount, parse_amount, parse_decimal, scale_of, truncate

HOURS_PER_YEAR = 8760
APR_SCALE = 18
MAX_TIERS = 16
MAX_TERM_DAYS = 3650
# The accrual topic's consumer identity in the kernel inbox.
PAYOUT_CONSUMER = "simple_earn-payouts"

_PRODUCT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Same grammar as a wallet owner: the user id becomes the owner of wallet accounts.
_USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}")
_JOB = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_PERIOD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:T-]{0,31}")


class Kind(StrEnum):
    FLEXIBLE = "flexible"
    FIXED = "fixed"


class Status(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"


class PositionStatus(StrEnum):
    ACTIVE = "active"
    MATURED = "matured"
    REDEEMED = "redeemed"


class Cadence(StrEnum):
    DAILY = "daily"
    HOURLY = "hourly"


# ---- names --------------------------------------------------------------------------


def check_product_id(value: str, field: str = "product_id") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if not _PRODUCT_ID.fullmatch(value):
        raise InvalidArgument(field, "must be 1 to 64 characters of letters, digits and _ . - (starting with a letter or digit)")
    return value


def check_user_id(value: str, field: str = "user_id") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if not _USER_ID.fullmatch(value):
        raise InvalidArgument(field, "must be 1 to 64 characters of letters, digits and _ . : @ - (starting with a letter or digit)")
    return value


def check_job(value: str, field: str = "job") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if not _JOB.fullmatch(value):
        raise InvalidArgument(field, "must be 1 to 64 characters of letters, digits and _ . : -")
    return value


def check_period(value: str, field: str = "period") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if not _PERIOD.fullmatch(value):
        raise InvalidArgument(field, "must be 1 to 32 characters of letters, digits and _ . : T -")
    return value


def check_position_id(value: str, field: str = "position_id") -> int:
    if not value:
        raise InvalidArgument(field, "is required")
    if not value.isdigit() or len(value) > 18 or value.startswith("0"):
        raise InvalidArgument(field, "must be a decimal id")
    return int(value)


# ---- tiers --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tier:
    """The part of a principal below ``up_to`` (and above the previous tier's) earns ``apr``.
    ``up_to`` None: no upper bound (the last tier)."""

    up_to: Decimal | None
    apr: Decimal


Tiers = tuple[Tier, ...]


def parse_tiers(raw: Sequence[tuple[str, str]], asset: str, field: str = "tiers") -> Tiers:
    """Validate (up_to, apr) pairs: at least one, ascending ``up_to`` parsed with the asset's
    scale, the last one unbounded (empty), APRs non-negative with at most 18 fraction digits."""
    scale = scale_of(asset)
    if not raw:
        raise InvalidArgument(field, "at least one tier is required (the last with an empty up_to)")
    if len(raw) > MAX_TIERS:
        raise InvalidArgument(field, f"at most {MAX_TIERS} tiers")
    tiers: list[Tier] = []
    previous = Decimal(0)
    for i, (up_to, apr) in enumerate(raw):
        last = i == len(raw) - 1
        rate = parse_decimal(apr, f"{field}[{i}].apr", scale=APR_SCALE, allow_zero=True)
        if last:
            if up_to:
                raise InvalidArgument(f"{field}[{i}].up_to", "the last tier must be unbounded (empty up_to)")
            tiers.append(Tier(None, rate))
            continue
        if not up_to:
            raise InvalidArgument(f"{field}[{i}].up_to", "is required on every tier but the last")
        bound = parse_decimal(up_to, f"{field}[{i}].up_to", scale=scale)
        if bound <= previous:
            raise InvalidArgument(f"{field}[{i}].up_to", f"must be greater than the previous tier's up_to ({format_amount(previous)})")
        tiers.append(Tier(bound, rate))
        previous = bound
    return tuple(tiers)


def brackets(principal: Decimal, tiers: Tiers) -> list[tuple[Decimal, Decimal]]:
    """The principal split by tier: (amount in the bracket, its APR), brackets with nothing left out."""
    out: list[tuple[Decimal, Decimal]] = []
    lower = Decimal(0)
    for tier in tiers:
        if principal <= lower:
            break
        upper = principal if tier.up_to is None else min(principal, tier.up_to)
        out.append((upper - lower, tier.apr))
        if tier.up_to is None:
            break
        lower = tier.up_to
    return out


def apr_weighted(principal: Decimal, tiers: Tiers) -> Decimal:
    """Sum over brackets of amount x APR: the yearly interest of ``principal``, exact."""
    with localcontext(EXACT):
        return sum((amount * apr for amount, apr in brackets(principal, tiers)), Decimal(0))


def hourly_accrual(principal: Decimal, tiers: Tiers) -> Decimal:
    """Interest of one hour, at high precision (never rounded to the asset)."""
    with localcontext(EXACT):
        return apr_weighted(principal, tiers) / HOURS_PER_YEAR


def fixed_interest(principal: Decimal, tiers: Tiers, hours: int, asset: str) -> Decimal:
    """Interest of a fixed-term position over ``hours`` full hours, truncated to the asset's scale."""
    if hours <= 0:
        return Decimal(0)
    with localcontext(EXACT):
        return truncate(apr_weighted(principal, tiers) * hours / HOURS_PER_YEAR, scale_of(asset))


# ---- hours --------------------------------------------------------------------------


def unix_hour(at: datetime) -> int:
    """The hour containing ``at``."""
    return int(at.timestamp()) // 3600


def next_full_hour(at: datetime) -> int:
    """The first UTC hour boundary after ``at``: when a subscription starts accruing."""
    return unix_hour(at) + 1


def hour_start(hour: int) -> datetime:
    return datetime.fromtimestamp(hour * 3600, tz=UTC)


def maturity_hour(accrues_from_hour: int, term_days: int) -> int:
    return accrues_from_hour + term_days * 24


def accruing_at(changes: Iterable[tuple[int, Decimal]], hour: int) -> Decimal:
    """The principal that accrues during ``hour``, from (effective_hour, delta) rows."""
    return sum((delta for eff, delta in changes if eff <= hour), Decimal(0))


# ---- subscriptions ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    min_subscription: Decimal
    max_per_user: Decimal | None
    quota: Decimal | None


def check_limits(limits: Limits, field: str = "min_subscription") -> Limits:
    if limits.max_per_user is not None and limits.max_per_user < limits.min_subscription:
        raise InvalidArgument("max_per_user", f"must be at least min_subscription ({format_amount(limits.min_subscription)})")
    if limits.quota is not None and limits.quota < limits.min_subscription:
        raise InvalidArgument("quota", f"must be at least min_subscription ({format_amount(limits.min_subscription)})")
    return limits


def left_quota(quota: Decimal | None, subscribed: Decimal) -> Decimal | None:
    return None if quota is None else max(Decimal(0), quota - subscribed)


def check_subscription(
    *,
    product_id: str,
    asset: str,
    status: Status,
    limits: Limits,
    amount: Decimal,
    user_total: Decimal,
    subscribed: Decimal,
) -> None:
    """The preconditions of a subscription; FAILED_PRECONDITION naming the rule broken."""
    if status is not Status.ACTIVE:
        raise FailedPrecondition(f"product {product_id} is paused: it accepts no subscriptions")
    if amount < limits.min_subscription:
        raise FailedPrecondition(
            f"amount: {format_amount(amount)} is below the product's min_subscription of {format_amount(limits.min_subscription)} {asset}"
        )
    if limits.max_per_user is not None and user_total + amount > limits.max_per_user:
        room = max(Decimal(0), limits.max_per_user - user_total)
        raise FailedPrecondition(
            f"amount: the user may hold at most {format_amount(limits.max_per_user)} {asset} in product {product_id};"
            f" {format_amount(room)} {asset} left for this user"
        )
    left = left_quota(limits.quota, subscribed)
    if left is not None and amount > left:
        raise FailedPrecondition(
            f"amount: {format_amount(amount)} exceeds the left quota of product {product_id}: {format_amount(left)} {asset}"
        )


def parse_optional_amount(text: str, asset: str, field: str) -> Decimal | None:
    return None if not text else parse_amount(text, asset, field)


# ---- redemptions --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedemptionSplit:
    pending: Decimal  # not yet accruing (subscribed this hour): stops at the next hour
    accruing: Decimal  # accruing now: stops from the start of this hour


def split_redemption(amount: Decimal, total: Decimal, accruing: Decimal) -> RedemptionSplit:
    """Take the amount from what does not accrue yet first, then from what accrues.

    ``total`` is the principal, ``accruing`` the part of it that accrues in the current hour.
    """
    if amount <= 0:
        raise InvalidArgument("amount", "must be greater than zero")
    if amount > total:
        raise FailedPrecondition(f"amount: {format_amount(amount)} exceeds the position's principal of {format_amount(total)}")
    pending = max(Decimal(0), total - accruing)
    from_pending = min(amount, pending)
    return RedemptionSplit(from_pending, amount - from_pending)


def redemption_changes(hour: int, split: RedemptionSplit) -> list[tuple[int, Decimal]]:
    """The principal changes of a redemption during ``hour``: pending part from the next
    hour, accruing part from the start of this hour."""
    changes: list[tuple[int, Decimal]] = []
    if split.accruing > 0:
        changes.append((hour, -split.accruing))
    if split.pending > 0:
        changes.append((hour + 1, -split.pending))
    return changes


def take_from_holds(amount: Decimal, holds: Sequence[tuple[int, Decimal]]) -> list[tuple[int, Decimal]]:
    """Which holds give ``amount`` back: (hold_id, remaining) newest first; returns (hold_id, take)."""
    out: list[tuple[int, Decimal]] = []
    left = amount
    for hold_id, remaining in holds:
        if left <= 0:
            break
        take = min(left, remaining)
        if take > 0:
            out.append((hold_id, take))
            left -= take
    if left > 0:
        raise FailedPrecondition(f"amount: the position's holds cover {format_amount(amount - left)} less than {format_amount(amount)}")
    return out


# ---- fixed-term ---------------------------------------------------------------------


def matures_at(accrues_from_hour: int, term_days: int) -> datetime:
    return hour_start(accrues_from_hour) + timedelta(days=term_days)


def hourly_records(
    changes: Sequence[tuple[int, Decimal]],
    rates: Sequence[tuple[int, Tiers]],
    start: int,
    end: int,
) -> list[tuple[int, Decimal, Decimal]]:
    """Per hour in [start, end): (hour, accruing principal, exact accrual), hours with a
    positive principal only. ``rates`` are (effective_hour, tiers) in the order set; the
    last one set for an hour applies."""
    ordered_rates = sorted(enumerate(rates), key=lambda x: (x[1][0], x[0]))
    out: list[tuple[int, Decimal, Decimal]] = []
    for hour in range(start, end):
        principal = accruing_at(changes, hour)
        if principal <= 0:
            continue
        tiers: Tiers | None = None
        for _, (eff, t) in ordered_rates:
            if eff <= hour:
                tiers = t
            else:
                break
        if tiers is None:
            continue
        out.append((hour, principal, hourly_accrual(principal, tiers)))
    return out
