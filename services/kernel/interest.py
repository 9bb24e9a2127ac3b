"""Tiered interest, exactly: rate indices, position ledgers, payouts with carry (pure).

Units. An APR is a yearly simple rate as a fraction; an hour earns APR / 8760. The
index sums *APR-hours* (APR x hours, exact decimals) and a position accumulates
*principal x APR-hours* ("units", also exact decimals: products and sums of finite
decimals under ``money.EXACT`` never round at the sizes the platform allows). Division by
8760 happens only when an amount is taken — for a payout or a displayed record — and
the remainder of a payout is kept in units, so ``paid + carry`` is the exact total with
no rounding anywhere.

Hours are unix hours (epoch seconds // 3600). A span ``[from_hour, to_hour)`` covers the
hours ``from_hour .. to_hour - 1``.

Tiers work like income-tax brackets: with 0-5 at 8% and 5-10 at 3%, a principal of 7
earns 5 x 8% + 2 x 3%. Above the last bounded tier nothing is earned unless the last
tier is unbounded.

Used by the accrual engine (flexible positions, from its input events) and by Simple Earn
(fixed-term interest, hourly interest records on query). No I/O, no protobuf types are
required (``parse_tiers`` only reads ``up_to`` and ``apr`` attributes).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import Any, Protocol

from services.kernel import money
from services.kernel.errors import InvalidArgument

HOURS_PER_YEAR = 8760
APR_SCALE = 18  # at most 18 fraction digits in an APR
BOUND_SCALE = 18  # tier bounds: amounts of any asset (the largest scale is 18)
ZERO = Decimal(0)
_YEAR = Decimal(HOURS_PER_YEAR)


# --------------------------------------------------------------------------- tiers


@dataclass(frozen=True, slots=True)
class Tier:
    """The part of a principal between the previous tier's bound and ``up_to`` earns
    ``apr``; ``up_to`` None: no upper bound (only the last tier)."""

    up_to: Decimal | None
    apr: Decimal


class _RateTierLike(Protocol):
    up_to: str
    apr: str


def validate_tiers(tiers: Sequence[Tier], field_name: str = "tiers") -> tuple[Tier, ...]:
    """Check the shape of a tier list: non-empty, bounds strictly ascending and positive,
    only the last tier unbounded, APRs >= 0."""
    if not tiers:
        raise InvalidArgument(field_name, "needs at least one tier")
    previous = ZERO
    for i, tier in enumerate(tiers):
        last = i == len(tiers) - 1
        if tier.apr < 0 or not tier.apr.is_finite():
            raise InvalidArgument(f"{field_name}[{i}].apr", "must be a decimal >= 0")
        if tier.up_to is None:
            if not last:
                raise InvalidArgument(f"{field_name}[{i}].up_to", "only the last tier may be unbounded")
            continue
        if not tier.up_to.is_finite() or tier.up_to <= previous:
            raise InvalidArgument(
                f"{field_name}[{i}].up_to",
                f"must be greater than the previous tier's bound ({money.format_amount(previous)})",
            )
        previous = tier.up_to
    return tuple(tiers)


def parse_tiers(tiers: Iterable[_RateTierLike], field_name: str = "tiers") -> tuple[Tier, ...]:
    """Tiers from protobuf ``RateTier`` messages, validated for a product's rate table:
    bounds ascending, the last tier unbounded (empty ``up_to``), APRs >= 0 with at most
    18 fraction digits. Raises InvalidArgument naming the offending field."""
    items = list(tiers)
    if not items:
        raise InvalidArgument(field_name, "needs at least one tier")
    parsed: list[Tier] = []
    for i, item in enumerate(items):
        apr = money.parse_decimal(item.apr, f"{field_name}[{i}].apr", scale=APR_SCALE, allow_zero=True)
        last = i == len(items) - 1
        if last:
            if item.up_to:
                raise InvalidArgument(
                    f"{field_name}[{i}].up_to", "the last tier must be unbounded (empty up_to)"
                )
            parsed.append(Tier(None, apr))
        else:
            if not item.up_to:
                raise InvalidArgument(f"{field_name}[{i}].up_to", "only the last tier may be unbounded")
            up_to = money.parse_decimal(item.up_to, f"{field_name}[{i}].up_to", scale=BOUND_SCALE)
            parsed.append(Tier(up_to, apr))
    return validate_tiers(parsed, field_name)


def bracket_amounts(principal: Decimal, tiers: Sequence[Tier]) -> list[Decimal]:
    """How much of ``principal`` falls in each tier's bracket (a negative principal: none)."""
    out: list[Decimal] = []
    lower = ZERO
    with localcontext(money.EXACT):
        for tier in tiers:
            if principal <= lower:
                out.append(ZERO)
            elif tier.up_to is None or principal < tier.up_to:
                out.append(principal - lower)
            else:
                out.append(tier.up_to - lower)
            if tier.up_to is not None:
                lower = tier.up_to
    return out


def hourly_apr_units(principal: Decimal, tiers: Sequence[Tier]) -> Decimal:
    """principal x APR summed over the brackets: one hour's interest times 8760."""
    with localcontext(money.EXACT):
        return sum(
            (amount * tier.apr for amount, tier in zip(bracket_amounts(principal, tiers), tiers, strict=True)),
            ZERO,
        )


def units_to_amount(units: Decimal) -> Decimal:
    """principal x APR-hours -> an amount (divides by 8760 under money.EXACT)."""
    with localcontext(money.EXACT):
        return units / _YEAR


def tiers_to_json(tiers: Sequence[Tier]) -> list[list[str | None]]:
    return [[None if t.up_to is None else str(t.up_to), str(t.apr)] for t in tiers]


def tiers_from_json(data: Sequence[Sequence[str | None]]) -> tuple[Tier, ...]:
    return tuple(Tier(None if up is None else Decimal(up), Decimal(apr)) for up, apr in data)


# --------------------------------------------------------------------------- rate index


@dataclass(frozen=True, slots=True)
class _Epoch:
    hour: int
    tiers: tuple[Tier, ...]
    bounds: tuple[Decimal | None, ...]
    # Cumulative APR-hours per tier at this epoch's start, since the start of its
    # segment (the run of consecutive epochs with the same bracket bounds).
    cum: tuple[Decimal, ...]


class RateIndex:
    """A product's rate history as ordered epochs ``(effective_hour, tiers)``.

    Consecutive epochs with the same bracket bounds form a *segment*; inside one, each
    tier's cumulative APR-hours is a running sum, so a constant principal's interest over
    any span inside a segment is one difference per tier. Where the bounds change a new
    segment starts, which keeps bracket changes exact. ``interest`` costs
    O(segments in the span x tiers + log epochs).

    Hours before the first epoch earn nothing. ``set_rates`` upserts an epoch (the same
    hour again replaces its tiers), so applying the same fact twice changes nothing.
    """

    __slots__ = ("_epochs", "_hours", "_segment_starts")

    def __init__(self, epochs: Iterable[tuple[int, Sequence[Tier]]] = ()) -> None:
        self._epochs: list[_Epoch] = []
        self._hours: list[int] = []
        self._segment_starts: list[int] = []
        raw = sorted({hour: tuple(tiers) for hour, tiers in epochs}.items())
        self._rebuild(raw, 0)

    # -- building

    def set_rates(self, effective_hour: int, tiers: Sequence[Tier]) -> bool:
        """Rates from ``effective_hour`` on (until the next epoch). Returns False when
        nothing changed (the same tiers at the same hour: a replayed fact)."""
        tiers = validate_tiers(tuple(tiers))
        i = bisect.bisect_left(self._hours, effective_hour)
        if i < len(self._hours) and self._hours[i] == effective_hour:
            if self._epochs[i].tiers == tiers:
                return False
            raw = [(e.hour, e.tiers) for e in self._epochs]
            raw[i] = (effective_hour, tiers)
        else:
            raw = [(e.hour, e.tiers) for e in self._epochs]
            raw.insert(i, (effective_hour, tiers))
        self._rebuild(raw, i)
        return True

    def _rebuild(self, raw: list[tuple[int, tuple[Tier, ...]]], start: int) -> None:
        """Recompute epochs from index ``start`` on (those before are unchanged)."""
        del self._epochs[start:]
        del self._hours[start:]
        while self._segment_starts and self._segment_starts[-1] >= start:
            self._segment_starts.pop()
        with localcontext(money.EXACT):
            for hour, tiers in raw[start:]:
                bounds = tuple(t.up_to for t in tiers)
                prev = self._epochs[-1] if self._epochs else None
                if prev is not None and prev.bounds == bounds:
                    span = hour - prev.hour
                    cum = tuple(c + t.apr * span for c, t in zip(prev.cum, prev.tiers, strict=True))
                else:
                    self._segment_starts.append(len(self._epochs))
                    cum = (ZERO,) * len(tiers)
                self._epochs.append(_Epoch(hour, tiers, bounds, cum))
                self._hours.append(hour)

    # -- reading

    @property
    def epochs(self) -> list[tuple[int, tuple[Tier, ...]]]:
        return [(e.hour, e.tiers) for e in self._epochs]

    def __len__(self) -> int:
        return len(self._epochs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RateIndex) and self.epochs == other.epochs

    def latest_bounds(self) -> tuple[Decimal | None, ...] | None:
        """The bracket bounds of the last epoch (None: no rates yet)."""
        return self._epochs[-1].bounds if self._epochs else None

    def tiers_at(self, hour: int) -> tuple[Tier, ...] | None:
        i = bisect.bisect_right(self._hours, hour) - 1
        return self._epochs[i].tiers if i >= 0 else None

    def _cum_at(self, e: int, hour: int) -> tuple[Decimal, ...]:
        epoch = self._epochs[e]
        span = hour - epoch.hour
        return tuple(c + t.apr * span for c, t in zip(epoch.cum, epoch.tiers, strict=True))

    def cumulative(self, hour: int, *, end: bool = False) -> tuple[int, tuple[Decimal, ...], tuple[Decimal | None, ...]] | None:
        """(segment number, each tier's cumulative APR-hours, bracket bounds) at ``hour``:
        as the start of a span (the epoch holding ``hour``) or, with ``end``, as the end
        of a span (the epoch holding ``hour - 1``). Inside one segment the interest of a
        constant principal over a span is one difference per tier of these cumulative
        values (what the engine's payout loop does in integers). None before the first
        epoch."""
        at = hour - 1 if end else hour
        e = bisect.bisect_right(self._hours, at) - 1
        if e < 0:
            return None
        segment = bisect.bisect_right(self._segment_starts, e) - 1
        with localcontext(money.EXACT):
            return segment, self._cum_at(e, hour), self._epochs[e].bounds

    def apr_hours(self, principal: Decimal, from_hour: int, to_hour: int) -> Decimal:
        """principal x APR-hours over [from_hour, to_hour) for a constant principal: the
        exact interest times 8760."""
        if not self._epochs or principal <= 0:
            return ZERO
        from_hour = max(from_hour, self._hours[0])
        if to_hour <= from_hour:
            return ZERO
        total = ZERO
        with localcontext(money.EXACT):
            e = bisect.bisect_right(self._hours, from_hour) - 1
            at = from_hour
            while at < to_hour:
                s = bisect.bisect_right(self._segment_starts, e) - 1
                next_start = self._segment_starts[s + 1] if s + 1 < len(self._segment_starts) else None
                end = to_hour if next_start is None else min(to_hour, self._hours[next_start])
                e_end = bisect.bisect_right(self._hours, end - 1) - 1
                begin_cum = self._cum_at(e, at)
                end_cum = self._cum_at(e_end, end)
                amounts = bracket_amounts(principal, self._epochs[e].tiers)
                for amount, a, b in zip(amounts, begin_cum, end_cum, strict=True):
                    if amount:
                        total += amount * (b - a)
                at = end
                if next_start is None:
                    break
                e = next_start
        return total

    def interest(self, principal: Decimal, from_hour: int, to_hour: int) -> Decimal:
        """The interest of a constant principal over [from_hour, to_hour) (money.EXACT)."""
        return units_to_amount(self.apr_hours(principal, from_hour, to_hour))

    # -- serialization (decimal strings, never floats)

    def to_json(self) -> str:
        return json.dumps([[e.hour, tiers_to_json(e.tiers)] for e in self._epochs], separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RateIndex:
        return cls((int(hour), tiers_from_json(tiers)) for hour, tiers in json.loads(text))


# --------------------------------------------------------------------------- principal paths


def principal_at(changes: Sequence[tuple[int, Decimal]], hour: int) -> Decimal:
    """The principal during ``hour`` given (effective_hour, delta) changes sorted by hour."""
    with localcontext(money.EXACT):
        return sum((d for h, d in changes if h <= hour), ZERO)


def path_apr_hours(index: RateIndex, changes: Sequence[tuple[int, Decimal]], from_hour: int, to_hour: int) -> Decimal:
    """principal x APR-hours over [from_hour, to_hour) for a principal that changes by
    ``changes`` (sorted by hour; each delta applies from its hour on)."""
    if to_hour <= from_hour:
        return ZERO
    total = ZERO
    with localcontext(money.EXACT):
        principal = ZERO
        i = 0
        while i < len(changes) and changes[i][0] <= from_hour:
            principal += changes[i][1]
            i += 1
        at = from_hour
        while at < to_hour:
            nxt = changes[i][0] if i < len(changes) else to_hour
            end = min(nxt, to_hour)
            if end > at:
                total += index.apr_hours(principal, at, end)
                at = end
            while i < len(changes) and changes[i][0] <= at:
                principal += changes[i][1]
                i += 1
    return total


@dataclass(frozen=True, slots=True)
class HourAccrual:
    hour: int
    principal: Decimal
    amount: Decimal  # exact (money.EXACT) interest of this hour


def hourly_accruals(
    index: RateIndex, changes: Sequence[tuple[int, Decimal]], from_hour: int, to_hour: int
) -> list[HourAccrual]:
    """One record per hour of [from_hour, to_hour) in which the position earned
    something (Simple Earn's hourly interest records). Cost O(hours in the span)."""
    out: list[HourAccrual] = []
    ordered = sorted(changes)
    for hour in range(from_hour, to_hour):
        principal = principal_at(ordered, hour)
        if principal <= 0:
            continue
        tiers = index.tiers_at(hour)
        if tiers is None:
            continue
        units = hourly_apr_units(principal, tiers)
        if units:
            out.append(HourAccrual(hour, principal, units_to_amount(units)))
    return out


# --------------------------------------------------------------------------- position ledger


@dataclass(frozen=True, slots=True)
class TakenPayout:
    paid: Decimal  # truncated to the scale
    carry: Decimal  # the remainder, exact to money.EXACT (for display)
    from_hour: int  # hours covered: [from_hour, boundary)


@dataclass(slots=True)
class PositionLedger:
    """A flexible position's accrual state.

    ``changes``: the principal history, (effective_hour, delta) merged per hour, sorted.
    ``settled_through``: interest over hours before it is accounted in ``accrued_units``
    and ``carry_units`` (None: never settled). ``accrued_units``: settled, unpaid
    interest in units (principal x APR-hours = amount x 8760), exact. ``carry_units``:
    the remainder below one unit of the asset left by the last payout, in units.

    A change that arrives late (its hour before ``settled_through``) settles at the
    index of its own hour: the difference it makes to the settled span is added to
    ``accrued_units`` at once and paid by the next payout. A late redemption can make it
    negative; a payout then pays nothing and keeps the debt for the next one.
    """

    changes: list[tuple[int, Decimal]] = field(default_factory=list)
    settled_through: int | None = None
    accrued_units: Decimal = ZERO
    carry_units: Decimal = ZERO

    @property
    def principal(self) -> Decimal:
        with localcontext(money.EXACT):
            return sum((d for _, d in self.changes), ZERO)

    @property
    def accrued(self) -> Decimal:
        return units_to_amount(self.accrued_units)

    @property
    def carry(self) -> Decimal:
        return units_to_amount(self.carry_units)

    def principal_at(self, hour: int) -> Decimal:
        return principal_at(self.changes, hour)

    def apply_change(self, index: RateIndex, effective_hour: int, delta: Decimal) -> None:
        """Add a principal change; a late one adjusts the settled interest exactly."""
        with localcontext(money.EXACT):
            if self.settled_through is not None and effective_hour < self.settled_through:
                before = path_apr_hours(index, self.changes, effective_hour, self.settled_through)
            i = bisect.bisect_left(self.changes, effective_hour, key=lambda c: c[0])
            if i < len(self.changes) and self.changes[i][0] == effective_hour:
                merged = self.changes[i][1] + delta
                if merged:
                    self.changes[i] = (effective_hour, merged)
                else:
                    del self.changes[i]
            elif delta:
                self.changes.insert(i, (effective_hour, delta))
            if self.settled_through is not None and effective_hour < self.settled_through:
                after = path_apr_hours(index, self.changes, effective_hour, self.settled_through)
                self.accrued_units += after - before

    def settle(self, index: RateIndex, until_hour: int) -> None:
        """Account the interest of the hours before ``until_hour`` (no-op if already)."""
        start = self.settled_through
        if start is None:
            if not self.changes:
                return
            start = self.changes[0][0]
        if until_hour <= start:
            if self.settled_through is None:
                self.settled_through = start
            return
        with localcontext(money.EXACT):
            self.accrued_units += path_apr_hours(index, self.changes, start, until_hour)
        self.settled_through = until_hour

    def take_payout(self, index: RateIndex, boundary_hour: int, scale: int) -> TakenPayout:
        """Settle to ``boundary_hour`` and pay accrued + carry truncated to ``scale``.

        Invariant: paid + carry == everything accrued and not paid before, exactly (the
        carry is kept in units, so no division remainder is lost)."""
        if self.settled_through is None and self.changes:
            from_hour = self.changes[0][0]
        else:
            from_hour = self.settled_through if self.settled_through is not None else boundary_hour
        self.settle(index, boundary_hour)
        with localcontext(money.EXACT):
            total_units = self.accrued_units + self.carry_units
            if total_units <= 0:
                # Nothing to pay (or a debt from a late redemption): keep it for later.
                self.accrued_units, self.carry_units = total_units, ZERO
                return TakenPayout(ZERO, units_to_amount(total_units), from_hour)
            paid = money.payout(units_to_amount(total_units), ZERO, scale).paid
            self.carry_units = total_units - paid * _YEAR
            self.accrued_units = ZERO
        return TakenPayout(paid, units_to_amount(self.carry_units), from_hour)

    # -- serialization (decimal strings, never floats)

    def to_dict(self) -> dict[str, Any]:
        return {
            "changes": [[h, str(d)] for h, d in self.changes],
            "settled_through": self.settled_through,
            "accrued_units": str(self.accrued_units),
            "carry_units": str(self.carry_units),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PositionLedger:
        return cls(
            changes=[(int(h), Decimal(d)) for h, d in data["changes"]],
            settled_through=data["settled_through"],
            accrued_units=Decimal(data["accrued_units"]),
            carry_units=Decimal(data["carry_units"]),
        )
