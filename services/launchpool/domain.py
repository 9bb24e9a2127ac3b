"""Launchpool rules as pure functions: projects and pools, caps and limits, the reward
schedule, estimated APR, which pools a payout at a boundary pays. No I/O.

Times: a project starts and ends on full UTC hours (unix hours ``start_hour`` and
``end_hour``); its hourly reward per pool is total / (end_hour - start_hour). Stakes
count from their own time, to the microsecond; the engine does the splitting
(``services.accrual.launchpool``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, localcontext
from enum import Enum

from services.kernel.errors import FailedPrecondition, InvalidArgument
from services.kernel.ids import check_id, check_job, check_period, check_user_id
from services.kernel.money import EXACT, format_amount, parse_amount, parse_decimal, scale_of


MAX_POOLS = 20
MAX_TIERS = 20
MAX_PROJECT_HOURS = 24 * 366
VOLUME_SCALE = 6  # trading volume in USDT
HOURS_PER_YEAR = 8760


class PayoutMode(str, Enum):
    HOURLY = "hourly"
    AT_END = "at_end"


class ProjectStatus(str, Enum):
    UPCOMING = "upcoming"
    ACTIVE = "active"
    ENDED = "ended"


def check_stake_id(value: str, field: str = "stake_id") -> int:
    if not value:
        raise InvalidArgument(field, "is required")
    if not (value.isascii() and value.isdigit()) or len(value) > 18 or value.startswith("0"):
        raise InvalidArgument(field, "must be a decimal id")
    return int(value)


def parse_optional(text: str, asset: str, field: str) -> Decimal | None:
    return parse_amount(text, asset, field) if text else None


@dataclass(frozen=True, slots=True)
class CapTier:
    min_volume: Decimal
    max_stake: Decimal


@dataclass(frozen=True, slots=True)
class PoolSpec:
    pool_id: str
    stake_asset: str
    total_reward: Decimal
    min_stake: Decimal
    max_stake: Decimal
    pool_cap: Decimal | None
    newcomer_only: bool
    cap_tiers: tuple[CapTier, ...]


class PoolLike:
    """What the parser reads from a RewardPoolSpec message (duck-typed)."""

    pool_id: str
    stake_asset: str
    total_reward: str
    min_stake: str
    max_stake: str
    pool_cap: str
    newcomer_only: bool
    cap_tiers: Sequence[object]


def parse_pool(raw: PoolLike, reward_asset: str, field: str) -> PoolSpec:
    pool_id = check_id(raw.pool_id, f"{field}.pool_id")
    if not raw.stake_asset:
        raise InvalidArgument(f"{field}.stake_asset", "is required")
    stake_asset = raw.stake_asset
    scale_of(stake_asset, f"{field}.stake_asset")
    total = parse_amount(raw.total_reward, reward_asset, f"{field}.total_reward")
    minimum = parse_amount(raw.min_stake, stake_asset, f"{field}.min_stake")
    maximum = parse_amount(raw.max_stake, stake_asset, f"{field}.max_stake")
    if maximum < minimum:
        raise InvalidArgument(f"{field}.max_stake", f"must be at least min_stake ({format_amount(minimum)})")
    cap = parse_optional(raw.pool_cap, stake_asset, f"{field}.pool_cap")
    if cap is not None and cap < minimum:
        raise InvalidArgument(f"{field}.pool_cap", f"must be at least min_stake ({format_amount(minimum)})")
    if len(raw.cap_tiers) > MAX_TIERS:
        raise InvalidArgument(f"{field}.cap_tiers", f"at most {MAX_TIERS} tiers")
    tiers: list[CapTier] = []
    for i, t in enumerate(raw.cap_tiers):
        name = f"{field}.cap_tiers[{i}]"
        volume = parse_decimal(t.min_volume, f"{name}.min_volume", scale=VOLUME_SCALE, allow_zero=True)  # type: ignore[attr-defined]
        stake = parse_amount(t.max_stake, stake_asset, f"{name}.max_stake")  # type: ignore[attr-defined]
        if stake < minimum:
            raise InvalidArgument(f"{name}.max_stake", f"must be at least min_stake ({format_amount(minimum)})")
        if tiers and volume <= tiers[-1].min_volume:
            raise InvalidArgument(f"{name}.min_volume", "tiers must be in increasing min_volume")
        tiers.append(CapTier(volume, stake))
    return PoolSpec(pool_id, stake_asset, total, minimum, maximum, cap, bool(raw.newcomer_only), tuple(tiers))


def check_window(start_hour: int, end_hour: int, now_hour: int) -> None:
    if end_hour <= start_hour:
        raise InvalidArgument("end_time", "must be after start_time")
    if end_hour - start_hour > MAX_PROJECT_HOURS:
        raise InvalidArgument("end_time", f"a project lasts at most {MAX_PROJECT_HOURS} hours")
    if end_hour <= now_hour:
        raise InvalidArgument("end_time", "must be in the future")


def check_pools(pools: Sequence[PoolSpec]) -> None:
    if not pools:
        raise InvalidArgument("pools", "at least one pool is required")
    if len(pools) > MAX_POOLS:
        raise InvalidArgument("pools", f"at most {MAX_POOLS} pools")
    seen_ids: set[str] = set()
    seen_assets: set[str] = set()
    for i, p in enumerate(pools):
        if p.pool_id in seen_ids:
            raise InvalidArgument(f"pools[{i}].pool_id", f"{p.pool_id} appears twice")
        if p.stake_asset in seen_assets:
            raise InvalidArgument(f"pools[{i}].stake_asset", f"one pool per stake coin: {p.stake_asset} appears twice")
        seen_ids.add(p.pool_id)
        seen_assets.add(p.stake_asset)


def hourly_reward(total: Decimal, start_hour: int, end_hour: int) -> Decimal:
    with localcontext(EXACT):
        return total / (end_hour - start_hour)


def status(start_hour: int, end_hour: int, now_hour_fraction: float) -> ProjectStatus:
    """From the current time in (fractional) unix hours."""
    if now_hour_fraction < start_hour:
        return ProjectStatus.UPCOMING
    if now_hour_fraction < end_hour:
        return ProjectStatus.ACTIVE
    return ProjectStatus.ENDED


def personal_cap(max_stake: Decimal, tiers: Sequence[CapTier], volume: Decimal) -> Decimal:
    """The most a user may hold: the cap of the highest tier whose min_volume the user's
    volume reaches; ``max_stake`` when there are no tiers or none is reached."""
    cap = max_stake
    for tier in tiers:
        if volume >= tier.min_volume:
            cap = tier.max_stake
    return cap


def check_stake(
    *, pool_id: str, asset: str, amount: Decimal, current: Decimal, minimum: Decimal, cap: Decimal,
    pool_cap: Decimal | None, pool_staked: Decimal, now_us: int, start_hour: int, end_hour: int,
    newcomer_only: bool, newcomer: bool,
) -> None:
    """The preconditions of a stake (FAILED_PRECONDITION, nothing written)."""
    if now_us < start_hour * 3600 * 10**6:
        raise FailedPrecondition(f"pool_id: pool {pool_id} opens at its project's start")
    if now_us >= end_hour * 3600 * 10**6:
        raise FailedPrecondition(f"pool_id: pool {pool_id} has ended")
    if newcomer_only and not newcomer:
        raise FailedPrecondition(f"pool_id: pool {pool_id} is for newcomers only (users who never staked in another project)")
    after = current + amount
    if after < minimum:
        raise FailedPrecondition(f"amount: the stake would be {format_amount(after)} {asset}; the minimum is {format_amount(minimum)}")
    if after > cap:
        raise FailedPrecondition(f"amount: the stake would be {format_amount(after)} {asset}; the personal cap is {format_amount(cap)}")
    if pool_cap is not None and pool_staked + amount > pool_cap:
        left = max(pool_cap - pool_staked, Decimal(0))
        raise FailedPrecondition(f"amount: the pool cap leaves {format_amount(left)} {asset}")


def check_unstake(*, asset: str, amount: Decimal, current: Decimal, minimum: Decimal) -> None:
    if current <= 0:
        raise FailedPrecondition("pool_id: nothing staked in this pool")
    if amount > current:
        raise FailedPrecondition(f"amount: {format_amount(amount)} is more than the stake ({format_amount(current)} {asset})")
    left = current - amount
    if 0 < left < minimum:
        raise FailedPrecondition(
            f"amount: {format_amount(left)} {asset} would remain, below the minimum {format_amount(minimum)}; unstake all or less"
        )


def reward_per_unit_per_year(hourly: Decimal, staked: Decimal) -> Decimal | None:
    if staked <= 0:
        return None
    with localcontext(EXACT):
        return hourly * HOURS_PER_YEAR / staked


def estimated_apr(per_unit_year: Decimal | None, reward_price: Decimal | None, stake_price: Decimal | None) -> Decimal | None:
    if per_unit_year is None or reward_price is None or stake_price is None or stake_price == 0:
        return None
    with localcontext(EXACT):
        return per_unit_year * reward_price / stake_price


def display(value: Decimal, digits: int = 18) -> str:
    """A derived quantity (rates, per-unit rewards) shown with at most ``digits`` fraction
    digits, rounded down."""
    with localcontext(EXACT):
        return format_amount(value.quantize(Decimal(1).scaleb(-digits)) if value.as_tuple().exponent < -digits else value)  # type: ignore[operator]


def pays_at(mode: PayoutMode, start_hour: int, end_hour: int, boundary_hour: int) -> bool:
    """Whether a payout at ``boundary_hour`` pays the pool: every boundary after the start
    up to the end (hourly), or the end only (at the end)."""
    if mode is PayoutMode.AT_END:
        return boundary_hour == end_hour
    return start_hour < boundary_hour <= end_hour


def parse_signed(text: str) -> Decimal:
    negative = text.startswith("-")
    value = parse_decimal(text[1:] if negative else text, "delta", scale=18)
    return -value if negative else value
