"""Simple Earn rules as pure functions: hours, limits, redemption split, maturity, payout
previews.

No I/O, no asyncio, no protobuf. Amounts are ``Decimal``; hours are unix hours
(seconds since the epoch // 3600). The interest maths itself (tiered APR like income tax,
rate history, exact accruals) is services.kernel.interest, shared with the accrual engine.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Protocol

from services.kernel import interest
from services.kernel.errors import FailedPrecondition, InvalidArgument
from services.kernel.ids import USER_ID, check_id
# User ids (the owner of wallet accounts), jobs and periods: the kernel's grammars, shared
# with every service that takes payouts; re-exported for this service's callers.
from services.kernel.ids import check_job as check_job
from services.kernel.ids import check_period as check_period
from services.kernel.ids import check_user_id as check_user_id
from services.kernel.interest import Tier
from services.kernel.money import EXACT, MAX_INTEGER_DIGITS, format_amount, parse_amount, parse_decimal, scale_of, truncate

MAX_TIERS = 16
MAX_TERM_DAYS = 3650
# The accrual topic's consumer identity in the kernel inbox.
PAYOUT_CONSUMER = "simple_earn-payouts"



class RateTierLike(Protocol):
    """A ``RateTier`` message or anything with its two string fields."""

    up_to: str
    apr: str


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
    return check_id(value, field)


def check_position_id(value: str, field: str = "position_id") -> int:
    if not value:
        raise InvalidArgument(field, "is required")
    if not (value.isascii() and value.isdigit()) or len(value) > 18 or value.startswith("0"):
        raise InvalidArgument(field, "must be a decimal id")
    return int(value)


# ---- tiers --------------------------------------------------------------------------
#
# The interest maths (tiers, brackets, rate history, hourly records, fixed-term interest)
# is the kernel's (services.kernel.interest), shared with the accrual engine, so what
# Simple Earn shows and pays at maturity is computed exactly like what the engine pays.
# Only Simple Earn's own rules live here: at most MAX_TIERS tiers, bounds in the asset's
# scale.

Tiers = tuple[Tier, ...]


def parse_tiers(raw: Iterable[RateTierLike], asset: str, field: str = "tiers") -> Tiers:
    """A product's rate table from ``RateTier``-like items (``up_to``, ``apr`` strings),
    validated by the kernel (ascending bounds, the last unbounded, APRs >= 0 with at most
    18 fraction digits) plus Simple Earn's rules: at most MAX_TIERS tiers, every bound in
    the asset's scale."""
    scale = scale_of(asset)
    items = list(raw)
    if len(items) > MAX_TIERS:
        raise InvalidArgument(field, f"at most {MAX_TIERS} tiers")
    tiers = interest.parse_tiers(items, field)
    for i, item in enumerate(items):
        if item.up_to:
            parse_decimal(item.up_to, f"{field}[{i}].up_to", scale=scale)
    return tiers


def fixed_interest(principal: Decimal, tiers: Tiers, hours: int, asset: str) -> Decimal:
    """Interest of a fixed-term position over ``hours`` full hours at its locked tiers,
    truncated to the asset's scale."""
    if hours <= 0:
        return Decimal(0)
    return truncate(interest.RateIndex([(0, tiers)]).interest(principal, 0, hours), scale_of(asset))


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


def accruing_at(changes: Sequence[tuple[int, Decimal]], hour: int) -> Decimal:
    """The principal that accrues during ``hour``, from (effective_hour, delta) rows."""
    return interest.principal_at(changes, hour)


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


@dataclass(frozen=True, slots=True)
class Order:
    """One Subscribe of a batch, as the batch plans it."""

    user_id: str
    amount: Decimal
    auto_subscribe: bool = False
    auto_renew: bool = False


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an accepted subscription goes: the user's open flexible position
    (``existing_id``) or the batch's ``new_index``-th new position."""

    existing_id: int | None = None
    new_index: int | None = None


@dataclass(slots=True)
class SubscriptionPlan:
    outcomes: list[Placement | FailedPrecondition]  # per order, in order
    new_positions: list[str]  # the owner of each new position
    subscribed: Decimal  # the product's total after the accepted orders


def plan_subscriptions(
    *,
    product_id: str,
    asset: str,
    kind: Kind,
    status: Status,
    limits: Limits,
    subscribed: Decimal,
    user_totals: dict[str, Decimal],
    open_flexible: dict[str, int],
    orders: Sequence[Order],
) -> SubscriptionPlan:
    """A batch of one product's Subscribes, decided as if they came one after another in
    this order: each is checked (``check_subscription``) against the totals the ones
    before it left, and a refused one changes nothing. A flexible product keeps one open
    position per user (the open one, or one new one shared by the user's orders of the
    batch); a fixed-term order opens its own."""
    totals = dict(user_totals)
    outcomes: list[Placement | FailedPrecondition] = []
    new_positions: list[str] = []
    new_flexible: dict[str, int] = {}
    for order in orders:
        user_total = totals.get(order.user_id, Decimal(0))
        try:
            check_subscription(
                product_id=product_id, asset=asset, status=status, limits=limits, amount=order.amount,
                user_total=user_total, subscribed=subscribed,
            )
        except FailedPrecondition as refused:
            outcomes.append(refused)
            continue
        totals[order.user_id] = user_total + order.amount
        subscribed += order.amount
        if kind is Kind.FLEXIBLE and order.user_id in open_flexible:
            outcomes.append(Placement(existing_id=open_flexible[order.user_id]))
        elif kind is Kind.FLEXIBLE and order.user_id in new_flexible:
            outcomes.append(Placement(new_index=new_flexible[order.user_id]))
        else:
            if kind is Kind.FLEXIBLE:
                new_flexible[order.user_id] = len(new_positions)
            new_positions.append(order.user_id)
            outcomes.append(Placement(new_index=len(new_positions) - 1))
    return SubscriptionPlan(outcomes, new_positions, subscribed)


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


def rate_index(rates: Iterable[tuple[int, Sequence[Tier]]]) -> interest.RateIndex:
    """The kernel's rate index of (effective_hour, tiers) in the order set: of several set
    for the same hour, the last applies (like the accrual engine's upsert)."""
    return interest.RateIndex(rates)


def hourly_records(
    changes: Sequence[tuple[int, Decimal]],
    rates: Sequence[tuple[int, Tiers]],
    start: int,
    end: int,
) -> list[tuple[int, Decimal, Decimal]]:
    """Per hour in [start, end): (hour, accruing principal, exact accrual), hours with a
    positive principal and a rate only (an hour at 0% is listed with 0). ``rates`` are
    (effective_hour, tiers) in the order set; the last one set for an hour applies."""
    index = rate_index(rates)
    accrued = {a.hour: a for a in interest.hourly_accruals(index, changes, start, end)}
    ordered = sorted(changes)
    out: list[tuple[int, Decimal, Decimal]] = []
    for hour in range(start, end):
        found = accrued.get(hour)
        if found is not None:
            out.append((hour, found.principal, found.amount))
            continue
        # The kernel lists earning hours only; an hour that earns nothing at a 0% tier
        # is still listed, as Simple Earn always did.
        principal = interest.principal_at(ordered, hour)
        if principal > 0 and index.tiers_at(hour) is not None:
            out.append((hour, principal, Decimal(0)))
    return out


# ---- payout preview ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PreviewedPayout:
    amount: Decimal  # truncated to the asset's scale
    from_hour: int  # hours covered: [from_hour, boundary)
    paid_before: Decimal  # what the payouts before must have paid in all (for reconciliation)


def merged_changes(changes: Iterable[tuple[int, Decimal]]) -> list[tuple[int, Decimal]]:
    """(effective_hour, delta) merged per hour, zero sums dropped, sorted: the principal
    history as the accrual engine's ledger keeps it."""
    per_hour: dict[int, Decimal] = {}
    for hour, delta in changes:
        per_hour[hour] = EXACT.add(per_hour.get(hour, Decimal(0)), delta)
    return sorted((h, d) for h, d in per_hour.items() if d)


def preview_payout(
    index: interest.RateIndex,
    changes: Iterable[tuple[int, Decimal]],
    boundary_hour: int,
    previous_boundary: int | None,
    scale: int,
) -> PreviewedPayout | None:
    """What a flexible position's payout up to ``boundary_hour`` pays, exactly like the
    accrual engine: the engine keeps the unpaid remainder as carry, so after each payout
    the total paid is the cumulative exact interest truncated to the scale, and a payout
    pays truncate(cumulative interest up to the boundary) - truncate(cumulative interest
    up to the position's previous payout boundary). None: the position never accrues."""
    merged = merged_changes(changes)
    if not merged:
        return None
    first = merged[0][0]
    if previous_boundary is None:
        if first >= boundary_hour:
            return None  # starts accruing after the boundary: not paid yet
        before_units, from_hour = Decimal(0), first
    else:
        before_units, from_hour = interest.path_apr_hours(index, merged, first, previous_boundary), previous_boundary
    if boundary_hour <= from_hour:
        return PreviewedPayout(Decimal(0), from_hour, truncate(interest.units_to_amount(before_units), scale))
    after_units = EXACT.add(before_units, interest.path_apr_hours(index, merged, from_hour, boundary_hour))
    paid_before = truncate(interest.units_to_amount(before_units), scale)
    paid_after = truncate(interest.units_to_amount(after_units), scale)
    return PreviewedPayout(max(Decimal(0), paid_after - paid_before), from_hour, paid_before)


# ---- payout batches (columns) -------------------------------------------------------------
#
# A PayoutBatch carries its items as parallel columns of strings. They are checked here
# in a tight loop: one regular expression over each whole column (joined by newlines, the
# form the store sends to PostgreSQL), and only when a column fails, item by item to
# name the culprits. No per-item object is built.

_POSITION_LINE = re.compile(r"[1-9][0-9]{0,17}")
_USER_LINE = USER_ID
_AMOUNT_LINES: dict[int, re.Pattern[str]] = {}


def _column(line: re.Pattern[str]) -> re.Pattern[str]:
    """Lines of ``line`` joined by newlines (``line`` never matches a newline)."""
    return re.compile(rf"(?:{line.pattern}\n)*{line.pattern}")


_POSITION_COLUMN = _column(_POSITION_LINE)
_USER_COLUMN = _column(_USER_LINE)
_AMOUNT_COLUMNS: dict[int, re.Pattern[str]] = {}


def _amount_line(scale: int) -> re.Pattern[str]:
    """An amount > 0 in the strict grammar with at most ``scale`` fraction digits."""
    pattern = _AMOUNT_LINES.get(scale)
    if pattern is None:
        fraction = rf"(?:\.[0-9]{{1,{scale}}})?" if scale > 0 else ""
        pattern = re.compile(rf"(?!0(?:\.0*)?(?:\n|\Z))(?:0|[1-9][0-9]{{0,{MAX_INTEGER_DIGITS - 1}}}){fraction}")
        _AMOUNT_LINES[scale] = pattern
        _AMOUNT_COLUMNS[scale] = _column(pattern)
    return pattern


def _bad_lines(values: Sequence[str], text: str, line: re.Pattern[str], column: re.Pattern[str]) -> list[int]:
    """Indexes of the values that break ``line``: one match over the whole column first
    (and a count of its lines, so a value holding a newline cannot pass as two), item by
    item only when that fails."""
    if not values or (text.count("\n") == len(values) - 1 and column.fullmatch(text)):
        return []
    return [i for i, value in enumerate(values) if not line.fullmatch(value)]


@dataclass(frozen=True, slots=True)
class PayoutColumns:
    """A batch's item columns, checked: the text of each column to record (one line per
    item kept) and the items left out, by index, with why."""

    position_ids: str
    user_ids: str
    amounts: str
    kept: list[int] | None  # the indexes kept, when some were left out; None: all
    problems: dict[int, str]


def check_payout_columns(position_ids: Sequence[str], user_ids: Sequence[str], amounts: Sequence[str], asset: str) -> PayoutColumns:
    """Check the columns of a PayoutBatch for ``asset``: equal lengths (else the batch is
    refused: INVALID_ARGUMENT), then per item a position id, a user id (the grammar of a
    wallet owner) and an amount > 0 with at most the asset's scale of fraction digits; a
    position listed twice is paid once (the first). Items that fail are left out."""
    n = len(position_ids)
    if len(user_ids) != n or len(amounts) != n:
        raise InvalidArgument(
            "position_ids", f"the item columns differ in length ({n} position ids, {len(user_ids)} user ids, {len(amounts)} amounts)"
        )
    scale = scale_of(asset)
    amount_line = _amount_line(scale)
    ids_text, users_text, amounts_text = "\n".join(position_ids), "\n".join(user_ids), "\n".join(amounts)
    problems: dict[int, str] = {}
    for i in _bad_lines(position_ids, ids_text, _POSITION_LINE, _POSITION_COLUMN):
        problems.setdefault(i, f"position {position_ids[i][:40]!r}: not a position id")
    for i in _bad_lines(user_ids, users_text, _USER_LINE, _USER_COLUMN):
        problems.setdefault(i, f"position {position_ids[i][:40]!r}: user id {user_ids[i][:64]!r} breaks the user id grammar")
    for i in _bad_lines(amounts, amounts_text, amount_line, _AMOUNT_COLUMNS[scale]):
        problems.setdefault(
            i, f"position {position_ids[i][:40]!r}: amount {amounts[i][:48]!r} is not a decimal > 0 with at most {scale} fraction digits"
        )
    if len(set(position_ids)) != n:
        seen: set[str] = set()
        for i, value in enumerate(position_ids):
            if value in seen:
                problems.setdefault(i, f"position {value[:40]!r}: listed more than once in the batch; paid once")
            seen.add(value)
    if not problems:
        return PayoutColumns(ids_text, users_text, amounts_text, None, {})
    kept = [i for i in range(n) if i not in problems]
    return PayoutColumns(
        "\n".join(position_ids[i] for i in kept),
        "\n".join(user_ids[i] for i in kept),
        "\n".join(amounts[i] for i in kept),
        kept,
        problems,
    )


# Position ids per row of payout_claims (migration 0006): the bits of one bitmap.
CLAIM_SHIFT = 13
CLAIM_BLOCK = 1 << CLAIM_SHIFT


def claim_bitmaps(position_ids: Iterable[int]) -> dict[int, bytes]:
    """The bitmaps of payout_claims that hold ``position_ids``: per block
    (id // CLAIM_BLOCK), bit id % CLAIM_BLOCK set, bits counted from the high bit of the
    first byte as in PostgreSQL's bit strings. A batch's ids come in order, so the
    block's bitmap is looked up only when the block changes."""
    maps: dict[int, bytearray] = {}
    current, bits = -1, bytearray()
    for position_id in position_ids:
        block = position_id >> CLAIM_SHIFT
        if block != current:
            current, bits = block, maps.setdefault(block, bytearray(CLAIM_BLOCK // 8))
        bit = position_id & (CLAIM_BLOCK - 1)
        bits[bit >> 3] |= 0x80 >> (bit & 7)
    return {block: bytes(bits) for block, bits in maps.items()}


def bulk_credits(user_ids: Sequence[str], amounts: Sequence[str], keep: Sequence[int] | None) -> tuple[list[str], list[str]]:
    """The owners and amounts of a batch's wallet credit: the kept items, one credit per
    user (a user with two positions in the batch gets their sum), in the batch's order.
    Deterministic, so a redelivery sends the wallet the same request."""
    owners = list(user_ids) if keep is None else [user_ids[i] for i in keep]
    values = list(amounts) if keep is None else [amounts[i] for i in keep]
    if len(set(owners)) == len(owners):
        return owners, values
    total: dict[str, Decimal] = {}
    for owner, value in zip(owners, values, strict=True):
        total[owner] = EXACT.add(total.get(owner, Decimal(0)), Decimal(value))
    return list(total), [format_amount(v) for v in total.values()]
