"""CandyDrop rules as pure functions: campaigns and tasks, which event counts for which
task, completions and candies, prizes. No I/O.

Counting. A task sums the amounts of the events that count for it (spot volume in the
quote asset, futures notional in the settlement asset, deposits, Simple Earn
subscriptions); one completion per ``threshold`` of the sum, at most
``max_completions``; ``candies`` per completion. A sum commutes, so the order in which
events arrive does not matter. An event counts when its *event time* is inside the
campaign's window [start, end) and not before the user's registration. A first-deposit
task completes once, on the event the exchange flags as the user's first deposit.

Prizes (exact rationals, then truncated to the prize asset's scale; never more than the
pool in total, never more than the per-user cap each):
- pro rata: the pool split by candies; with a cap, a capped user's excess is split again
  among the others by candies ("water-filling"), so the pool is spent as fully as the
  cap allows;
- fixed per candy: candies x prize per candy, capped; when that asks for more than the
  pool, every prize is scaled by the same factor pool / demand (exchanges pay first come,
  first served, which depends on the order in which their events arrive).
What truncation leaves (less than one unit of the asset per winner) stays in the pool.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, localcontext
from enum import Enum
from fractions import Fraction

from services.kernel.errors import InvalidArgument
from services.kernel.ids import check, check_printable, check_user_id
from services.kernel.money import EXACT, format_amount, parse_amount, scale_of

_CAMPAIGN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")

MAX_TASKS = 20
MAX_CANDIES = 1_000_000
MAX_COMPLETIONS = 1_000_000
MAX_CAMPAIGN_HOURS = 24 * 366


class TaskKind(str, Enum):
    SPOT_VOLUME = "spot_volume"
    FUTURES_VOLUME = "futures_volume"
    DEPOSIT = "deposit"
    FIRST_DEPOSIT = "first_deposit"
    SIMPLE_EARN_SUBSCRIPTION = "simple_earn_subscription"


class PoolKind(str, Enum):
    PRO_RATA = "pro_rata"
    FIXED_PER_CANDY = "fixed_per_candy"


class Status(str, Enum):
    UPCOMING = "upcoming"
    ACTIVE = "active"
    ENDED = "ended"
    DISTRIBUTING = "distributing"
    DISTRIBUTED = "distributed"


def check_campaign_id(value: str, field: str = "campaign_id") -> str:
    return check(_CAMPAIGN_ID, value, field, "must be 1 to 48 characters of letters, digits and _ . - (starting with a letter or digit)")


def check_task_id(value: str, field: str) -> str:
    return check(_TASK_ID, value, field, "must be 1 to 32 characters of letters, digits and _ . - (starting with a letter or digit)")


def check_event_id(value: str, field: str = "event_id") -> str:
    return check_printable(value, field, 128)


def prize_account(campaign_id: str) -> str:
    """The wallet owner of the campaign's prize account (kind EXPENSE)."""
    return f"candydrop:{campaign_id}"


# ---- campaigns ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Task:
    task_id: str
    kind: TaskKind
    asset: str  # "" only for FIRST_DEPOSIT: any asset
    threshold: Decimal | None  # None only for FIRST_DEPOSIT: any amount
    candies: int
    max_completions: int


@dataclass(frozen=True, slots=True)
class Campaign:
    campaign_id: str
    prize_asset: str
    pool: Decimal
    pool_kind: PoolKind
    per_candy: Decimal | None
    cap: Decimal | None
    start: datetime
    end: datetime
    tasks: tuple[Task, ...]


def parse_task(
    *, task_id: str, kind: TaskKind | None, asset: str, threshold: str, candies: int, max_completions: int, field: str
) -> Task:
    task_id = check_task_id(task_id, f"{field}.task_id")
    if kind is None:
        raise InvalidArgument(f"{field}.kind", "is required (a CandyTaskKind other than UNSPECIFIED)")
    if asset:
        scale_of(asset, f"{field}.asset")
    elif kind is not TaskKind.FIRST_DEPOSIT:
        raise InvalidArgument(f"{field}.asset", "is required")
    value: Decimal | None = None
    if threshold:
        value = parse_amount(threshold, asset or "ETH", f"{field}.threshold") if asset else _any_asset_amount(threshold, f"{field}.threshold")
    elif kind is not TaskKind.FIRST_DEPOSIT:
        raise InvalidArgument(f"{field}.threshold", "is required")
    if not 1 <= candies <= MAX_CANDIES:
        raise InvalidArgument(f"{field}.candies", f"must be 1 to {MAX_CANDIES:,}")
    if not 1 <= max_completions <= MAX_COMPLETIONS:
        raise InvalidArgument(f"{field}.max_completions", f"must be 1 to {MAX_COMPLETIONS:,}")
    if kind is TaskKind.FIRST_DEPOSIT and max_completions != 1:
        raise InvalidArgument(f"{field}.max_completions", "a first deposit happens once: must be 1")
    return Task(task_id, kind, asset, value, candies, max_completions)


def _any_asset_amount(text: str, field: str) -> Decimal:
    from services.kernel.money import parse_decimal

    return parse_decimal(text, field, scale=18)


def check_tasks(tasks: Sequence[Task]) -> None:
    if not tasks:
        raise InvalidArgument("tasks", "at least one task is required")
    if len(tasks) > MAX_TASKS:
        raise InvalidArgument("tasks", f"at most {MAX_TASKS} tasks")
    seen: set[str] = set()
    for i, t in enumerate(tasks):
        if t.task_id in seen:
            raise InvalidArgument(f"tasks[{i}].task_id", f"{t.task_id} appears twice")
        seen.add(t.task_id)


def check_pool(*, prize_asset: str, pool: str, kind: PoolKind | None, per_candy: str, cap: str) -> tuple[Decimal, Decimal | None, Decimal | None]:
    """The pool, the prize per candy and the cap, parsed at the prize asset's scale."""
    total = parse_amount(pool, prize_asset, "prize_pool")
    if kind is None:
        raise InvalidArgument("pool_kind", "is required (PRO_RATA or FIXED_PER_CANDY)")
    value: Decimal | None = None
    if kind is PoolKind.FIXED_PER_CANDY:
        value = parse_amount(per_candy, prize_asset, "prize_per_candy")
    elif per_candy:
        raise InvalidArgument("prize_per_candy", "is for FIXED_PER_CANDY pools only")
    limit = parse_amount(cap, prize_asset, "per_user_cap") if cap else None
    return total, value, limit


def check_window(start_hour: int, end_hour: int, now_hour: int) -> None:
    if end_hour <= start_hour:
        raise InvalidArgument("end_time", "must be after start_time")
    if end_hour - start_hour > MAX_CAMPAIGN_HOURS:
        raise InvalidArgument("end_time", f"a campaign lasts at most {MAX_CAMPAIGN_HOURS} hours")
    if end_hour <= now_hour:
        raise InvalidArgument("end_time", "must be in the future")


def status(start: datetime, end: datetime, now: datetime, distribution: str | None) -> Status:
    if distribution == "distributed":
        return Status.DISTRIBUTED
    if distribution == "distributing":
        return Status.DISTRIBUTING
    if now < start:
        return Status.UPCOMING
    if now < end:
        return Status.ACTIVE
    return Status.ENDED


# ---- counting -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fact:
    """What an event contributes: ``amount`` of ``asset`` to tasks of ``kind``."""

    kind: TaskKind
    user_id: str
    asset: str
    amount: Decimal
    at: datetime
    first_deposit: bool = False


def facts_of_deposit(user_id: str, asset: str, amount: Decimal, at: datetime, first: bool) -> list[Fact]:
    out = [Fact(TaskKind.DEPOSIT, user_id, asset, amount, at)]
    if first:
        out.append(Fact(TaskKind.FIRST_DEPOSIT, user_id, asset, amount, at, True))
    return out


def counts(*, fact: Fact, task: Task, start: datetime, end: datetime, registered_at: datetime | None) -> Decimal:
    """The amount ``fact`` adds to ``task``'s progress (0: it does not count).

    FIRST_DEPOSIT adds 1 (its progress is 0 or 1); the others add the amount."""
    if registered_at is None or fact.at < registered_at or not (start <= fact.at < end):
        return Decimal(0)
    if fact.kind is not task.kind:
        return Decimal(0)
    if task.kind is TaskKind.FIRST_DEPOSIT:
        if not fact.first_deposit or (task.asset and fact.asset != task.asset):
            return Decimal(0)
        if task.threshold is not None and fact.amount < task.threshold:
            return Decimal(0)
        return Decimal(1)
    if fact.asset != task.asset:
        return Decimal(0)
    return fact.amount


def completions(task: Task, progress: Decimal) -> int:
    if task.kind is TaskKind.FIRST_DEPOSIT:
        return 1 if progress >= 1 else 0
    assert task.threshold is not None
    with localcontext(EXACT):
        done = int(progress // task.threshold)
    return min(done, task.max_completions)


def candies(task: Task, progress: Decimal) -> int:
    return completions(task, progress) * task.candies


def user_candies(tasks: Sequence[Task], progress: Mapping[str, Decimal]) -> int:
    """A user's candies from the progress of each task (by task id)."""
    return sum(candies(t, progress.get(t.task_id, Decimal(0))) for t in tasks)


# ---- prizes ---------------------------------------------------------------------------


def _floor(value: Fraction, scale: int) -> Decimal:
    units = value.numerator * 10**scale // value.denominator
    return Decimal(units).scaleb(-scale)


def exact_prizes(
    *, kind: PoolKind, pool: Decimal, per_candy: Decimal | None, cap: Decimal | None, candies: Mapping[str, int]
) -> dict[str, Fraction]:
    """Each user's exact prize (users with candies only)."""
    holders = {u: c for u, c in candies.items() if c > 0}
    if not holders:
        return {}
    total_pool = Fraction(pool)
    limit = None if cap is None else Fraction(cap)
    if kind is PoolKind.FIXED_PER_CANDY:
        assert per_candy is not None
        demand = {u: Fraction(per_candy) * c for u, c in holders.items()}
        if limit is not None:
            demand = {u: min(d, limit) for u, d in demand.items()}
        asked = sum(demand.values(), Fraction(0))
        if asked <= total_pool:
            return demand
        return {u: d * total_pool / asked for u, d in demand.items()}
    # Pro rata, water-filling under the cap: users whose share passes the cap get the cap,
    # the rest of the pool is split again among the others, until no share passes it.
    prizes: dict[str, Fraction] = {}
    left = dict(holders)
    remaining = total_pool
    while left:
        weight = sum(left.values())
        share = {u: remaining * c / weight for u, c in left.items()}
        over = [u for u, s in share.items() if limit is not None and s > limit] if limit is not None else []
        if not over:
            prizes.update(share)
            break
        for u in over:
            assert limit is not None
            prizes[u] = limit
            remaining -= limit
            del left[u]
    return prizes


def prizes(
    *, kind: PoolKind, pool: Decimal, per_candy: Decimal | None, cap: Decimal | None, candies: Mapping[str, int], scale: int
) -> dict[str, Decimal]:
    """Each user's prize truncated to ``scale``: sum <= pool, each <= cap."""
    return {u: _floor(v, scale) for u, v in exact_prizes(kind=kind, pool=pool, per_candy=per_candy, cap=cap, candies=candies).items()}


def value_per_candy(*, kind: PoolKind, pool: Decimal, per_candy: Decimal | None, total_candies: int) -> Decimal | None:
    """What one candy is worth at the current counts, before caps."""
    with localcontext(EXACT):
        if kind is PoolKind.FIXED_PER_CANDY:
            assert per_candy is not None
            if total_candies and per_candy * total_candies > pool:
                return pool / total_candies
            return per_candy
        if total_candies <= 0:
            return None
        return pool / total_candies


def display(value: Decimal, digits: int = 18) -> str:
    """A derived quantity shown with at most ``digits`` fraction digits, rounded down."""
    with localcontext(EXACT):
        if value.as_tuple().exponent < -digits:  # type: ignore[operator]
            value = value.quantize(Decimal(1).scaleb(-digits))
        return format_amount(value)
