"""HODLer Airdrop rules as pure functions: airdrops, counted holdings, the time integral,
averages, the split. No I/O.

Counted holdings of a user in an asset: the funding balance plus what the wallet holds
for Simple Earn (holder ``simple_earn``); holds of any other holder never count. Each
wallet posting changes them by a signed ``delta`` at its time ``t`` (whole microseconds
since the epoch).

The integral. For a window [s, e) the integral of a user's counted holdings over the
window is, from the changes alone (the balance before the first change being 0):

    I = sum over changes with t < e of delta x (e - max(t, s))
      = (e - s) x PRE + e x D1 - M1

with PRE = sum of the deltas before s (the balance at s), D1 = sum of the deltas in
[s, e) and M1 = sum of delta x t over [s, e). Each change adds to one of three sums, so
the integral is a commutative sum: the order in which changes arrive does not matter
and each is counted once (the consumer's inbox). The average is I / (e - s). With the
changes known so far, the same formula is the projection "if nothing changes until e"
that the estimates use.

The split (once, after the end): a user's counted average is 0 below ``min_average``,
else min(average, cap). reward = floor_to_scale(counted / sum of counted x total). The
sum never exceeds the total; what truncation leaves (less than one unit of the reward
asset per recipient) stays in the airdrop's account.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, localcontext
from enum import Enum
from fractions import Fraction

from services.kernel.errors import InvalidArgument
from services.kernel.ids import check
from services.kernel.money import EXACT, format_amount, parse_amount, scale_of

_AIRDROP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")

MAX_AIRDROP_HOURS = 24 * 366
HOUR_US = 3600 * 1_000_000
DEFAULT_MIN_AVERAGE = "1"
# The holder whose holds count (Simple Earn positions).
COUNTED_HOLDER = "simple_earn"


class Status(str, Enum):
    UPCOMING = "upcoming"
    ACTIVE = "active"
    ENDED = "ended"
    DISTRIBUTED = "distributed"


def check_airdrop_id(value: str, field: str = "airdrop_id") -> str:
    return check(_AIRDROP_ID, value, field, "must be 1 to 48 characters of letters, digits and _ . - (starting with a letter or digit)")


def reward_account(airdrop_id: str) -> str:
    """The wallet owner of the airdrop's reward account (kind EXPENSE)."""
    return f"hodler:{airdrop_id}"


@dataclass(frozen=True, slots=True)
class Airdrop:
    airdrop_id: str
    hold_asset: str
    reward_asset: str
    total: Decimal
    start_hour: int
    end_hour: int
    min_average: Decimal
    cap: Decimal | None

    @property
    def start_us(self) -> int:
        return self.start_hour * HOUR_US

    @property
    def end_us(self) -> int:
        return self.end_hour * HOUR_US


def parse_airdrop(
    *, airdrop_id: str, hold_asset: str, reward_asset: str, total: str, start_hour: int, end_hour: int, min_average: str, cap: str,
    now_us: int,
) -> Airdrop:
    """Validate a CreateAirdrop request; INVALID_ARGUMENT naming the first bad field."""
    airdrop_id = check_airdrop_id(airdrop_id)
    if not hold_asset:
        raise InvalidArgument("hold_asset", "is required")
    scale_of(hold_asset, "hold_asset")
    if not reward_asset:
        raise InvalidArgument("reward_asset", "is required")
    scale_of(reward_asset, "reward_asset")
    amount = parse_amount(total, reward_asset, "total")
    check_window(start_hour, end_hour, now_us)
    minimum = parse_amount(min_average or DEFAULT_MIN_AVERAGE, hold_asset, "min_average", allow_zero=True)
    limit = parse_amount(cap, hold_asset, "per_user_cap") if cap else None
    if limit is not None and limit < minimum:
        raise InvalidArgument("per_user_cap", "must not be below min_average")
    return Airdrop(airdrop_id, hold_asset, reward_asset, amount, start_hour, end_hour, minimum, limit)


def check_window(start_hour: int, end_hour: int, now_us: int) -> None:
    if start_hour <= 0:
        raise InvalidArgument("start_hour", "must be a positive unix hour")
    if end_hour <= start_hour:
        raise InvalidArgument("end_hour", "must be after start_hour")
    if end_hour - start_hour > MAX_AIRDROP_HOURS:
        raise InvalidArgument("end_hour", f"an airdrop lasts at most {MAX_AIRDROP_HOURS} hours")
    if start_hour * HOUR_US <= now_us:
        raise InvalidArgument("start_hour", "must be in the future")


def status(start_us: int, end_us: int, now_us: int, distribution: str | None) -> Status:
    if distribution == "distributed":
        return Status.DISTRIBUTED
    if now_us < start_us:
        return Status.UPCOMING
    if now_us < end_us:
        return Status.ACTIVE
    return Status.ENDED


# ---- counted holdings ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Leg:
    """One side of a wallet transfer: ``amount`` left (-) or reached (+) an account."""

    owner: str
    asset: str
    kind: str  # "funding", "hold", or another account kind
    amount: Decimal  # signed


def counted_changes(legs: Iterable[Leg], holder: str) -> dict[tuple[str, str], Decimal]:
    """(user, asset) -> the signed change of counted holdings a posting makes (zeros
    dropped): funding accounts always count, hold accounts only for holds of Simple Earn."""
    out: dict[tuple[str, str], Decimal] = {}
    with localcontext(EXACT):
        for leg in legs:
            if leg.kind == "funding" or (leg.kind == "hold" and holder == COUNTED_HOLDER):
                key = (leg.owner, leg.asset)
                out[key] = out.get(key, Decimal(0)) + leg.amount
    return {k: v for k, v in out.items() if v != 0}


@dataclass(frozen=True, slots=True)
class Sums:
    """A user's (or an airdrop's) three sums: PRE, D1, M1 (see the module's docstring)."""

    pre: Fraction = Fraction(0)
    d1: Fraction = Fraction(0)
    m1: Fraction = Fraction(0)

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.pre + other.pre, self.d1 + other.d1, self.m1 + other.m1)


def contribution(delta: Fraction | Decimal, t_us: int, start_us: int, end_us: int) -> Sums:
    """What one change adds to the sums of a window (nothing when t >= end)."""
    d = Fraction(delta)
    if t_us >= end_us:
        return Sums()
    if t_us < start_us:
        return Sums(pre=d)
    return Sums(d1=d, m1=d * t_us)


def integral(sums: Sums, start_us: int, end_us: int) -> Fraction:
    """Holding x microseconds over [start, end): (e - s) x PRE + e x D1 - M1."""
    return (end_us - start_us) * sums.pre + end_us * sums.d1 - sums.m1


def average(sums: Sums, start_us: int, end_us: int) -> Fraction:
    return integral(sums, start_us, end_us) / (end_us - start_us)


def hourly_averages(balance: Fraction, changes: Iterable[tuple[int, Fraction]], first_hour: int, end_hour: int) -> list[tuple[int, Fraction]]:
    """The average of each hour in [first_hour, end_hour): ``balance`` is the holding at
    the first hour's start, ``changes`` the (t, delta) in the hours, any order. Each hour
    is the three-sum formula on its own window, the balance at its start as PRE."""
    by_hour: dict[int, list[tuple[int, Fraction]]] = {}
    for t, delta in changes:
        by_hour.setdefault(t // HOUR_US, []).append((t, Fraction(delta)))
    out = []
    for hour in range(first_hour, end_hour):
        start, end = hour * HOUR_US, (hour + 1) * HOUR_US
        sums = Sums(pre=balance)
        for t, delta in by_hour.get(hour, ()):
            sums = sums + contribution(delta, t, start, end)
        out.append((hour, average(sums, start, end)))
        balance += sums.d1
    return out


def counted_average(avg: Fraction, min_average: Decimal, cap: Decimal | None) -> Fraction:
    """0 below the minimum (and for nothing held), else the average bounded by the cap."""
    if avg <= 0 or avg < Fraction(min_average):
        return Fraction(0)
    return min(avg, Fraction(cap)) if cap is not None else avg


def floor_to_scale(value: Fraction, scale: int) -> Decimal:
    units = value.numerator * 10**scale // value.denominator
    return Decimal(units).scaleb(-scale)


def split(counted: Mapping[str, Fraction], total: Decimal, scale: int) -> dict[str, Decimal]:
    """Each user's reward: floor_to_scale(counted / sum of counted x total), for users with
    a positive counted average. Sum <= total; each below its exact share by < 1 unit."""
    weights = {u: c for u, c in counted.items() if c > 0}
    whole = sum(weights.values(), Fraction(0))
    if whole == 0:
        return {}
    return {u: floor_to_scale(c * Fraction(total) / whole, scale) for u, c in weights.items()}


def per_unit(total: Decimal, projected_sum: Fraction) -> Fraction | None:
    """The estimated reward per unit held: total / the uncapped sum of projected averages."""
    return Fraction(total) / projected_sum if projected_sum > 0 else None


def display(value: Fraction, digits: int = 18) -> str:
    """A derived quantity with at most ``digits`` fraction digits, rounded down."""
    return format_amount(floor_to_scale(value, digits))
