"""The accrual engine's state transitions, pure: no faust, no Kafka, no protobuf.

State of one input partition (the faust app keeps it in changelog-backed tables):

- per product: its ``RateIndex`` and asset (the same in every partition: each partition
  sees the same ordered ``ProductRatesSet`` facts), and its ``PayoutHistory``: the last
  payout requests (job, period, boundary, the previous boundary, input offset);
- the partition's watermark: the last ``HourClosed`` hour;
- per position: a ``PositionState``: identity, principal history, closing hour, the ids
  of recently applied events, the input offset of the last event applied to it, and its
  *marks*: what it had been paid in all through recent payout boundaries.

**Payouts write nothing per position.** A position's exact interest from its start to
an hour h, E(h) (principal x APR-hours / 8760), is a function of its principal history
and the product's rate index. Truncation with a carried remainder means that through a
payout at boundary B a position has been paid floor(E(B)) at the asset's scale in all
(each payout pays what accrued plus the previous remainder, truncated; the remainder is
E(B) - floor(E(B)) and carries). So a payout at B after one at B0 pays
floor(E(B)) - paid(B0), where paid(B0) is

- max(latest mark, floor(E(B0))) when the position has not changed since the request
  of B0 (E is the same now as then), or
- its mark at B0, recorded when it changed: before a ``PositionChanged`` is applied the
  position *materialises* marks for the product's recent boundaries with the history
  as it was. A late change (an hour already paid) then changes E for paid hours, and the
  next payout pays the difference (never less than nothing: a debt waits).

A payout over a million positions therefore reads memory (``Book``) and emits batches;
it writes one record per product, plus the few positions closed and paid for good.

Redelivery (faust at-least-once, or a duplicate from the upstream outbox relay):

- a ``PositionChanged`` is skipped when its offset is <= the position's last applied
  offset (a faust replay after a crash: the table may be ahead of the committed offset)
  or its event id is among the position's recent ids (a duplicate publication);
- a ``ProductRatesSet`` is an upsert of the epoch at its hour: applying it again is a
  no-op;
- an ``HourClosed`` only moves the watermark forward;
- a ``PayoutRequested`` for a (job, period) in the product's history, at the same offset
  (a replay) or another (a duplicate publication), recomputes with the boundaries it
  recorded the first time and so re-emits exactly the same items (sinks drop them by
  batch id): positions unchanged since give the same amounts; positions changed after
  it answer from their marks at the two boundaries.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import Any

from services.kernel import money
from services.kernel.interest import (
    HOURS_PER_YEAR,
    PositionLedger,
    RateIndex,
    Tier,
    path_apr_hours,
    tiers_from_json,
    tiers_to_json,
)

RECENT_EVENT_IDS = 64  # per position: ids of the last applied PositionChanged events
RECENT_MARKS = 8  # per position: paid-through marks kept (replays reach back this far)
RECENT_REQUESTS = 64  # per product and partition: payout requests kept
# Items per PayoutBatch (Simple Earn pays a batch with one wallet BulkCredit, so at most
# its MAX_BATCH of 10,000). A payout request records the size it was emitted in, so a
# request met again after an upgrade is emitted again in the same batches.
BATCH_SIZE = 10_000
LEGACY_BATCH_SIZE = 5_000  # of the requests recorded before they kept their size
# A dropped position's marker is purged once it is this old both in event hours and in
# input offsets of its partition: far beyond any replay window of an at-least-once commit.
MARKER_KEEP_HOURS = 24 * 7
MARKER_KEEP_OFFSETS = 100_000
# Exact integers: APR-hours and principals have at most 18 fraction digits, so
# principal x APR-hours ("units") has at most 36: units are kept as int(units x 10^36).
UNIT_DIGITS = 36
_HALF = 18
_NO_RATES = RateIndex()


# --------------------------------------------------------------------------- keys


def product_key(partition: int, product_id: str) -> str:
    return f"{partition}:{product_id}"


def position_key(partition: int, product_id: str, position_id: str) -> str:
    """Keys carry the partition (so partitions never share a key) and the product (so a
    payout finds a product's positions by key prefix, without decoding values)."""
    return f"{partition}:{product_id}:{position_id}"


def partition_key(partition: int) -> str:
    return str(partition)


def split_position_key(key: str) -> tuple[int, str, str]:
    partition, rest = key.split(":", 1)
    product_id, position_id = rest.rsplit(":", 1) if ":" in rest else (rest, "")
    return int(partition), product_id, position_id


def split_product_key(key: str) -> tuple[int, str]:
    partition, product_id = key.split(":", 1)
    return int(partition), product_id


# --------------------------------------------------------------------------- exact integers


def to_int(value: Decimal, digits: int) -> int:
    """``value`` x 10^digits as an int; exact for values with at most ``digits`` fraction digits."""
    with localcontext(money.EXACT):
        return int(value.scaleb(digits))


def minor_divisor(scale: int) -> int:
    """Units (x 10^36) per smallest amount of an asset of ``scale``, times 8760: the
    paid-through amount in smallest units is ``units // minor_divisor(scale)``."""
    return HOURS_PER_YEAR * 10 ** (UNIT_DIGITS - scale)


def format_minor(value: int, scale: int) -> str:
    """An amount (>= 0) in the asset's smallest units as a canonical decimal string."""
    return _formatter(scale)(value)


def _formatter(scale: int) -> Any:
    """``format_minor`` for one scale, as a fast callable: the digits of ``str(value)``
    cut at the scale (about half the cost of ``divmod`` and a padded format)."""
    if scale == 0:
        return str

    def fmt(value: int) -> str:
        digits = str(value)
        if len(digits) > scale:
            whole, frac = digits[:-scale], digits[-scale:].rstrip("0")
        else:
            whole, frac = "0", digits.rjust(scale, "0").rstrip("0")
        return f"{whole}.{frac}" if frac else whole

    return fmt


@functools.lru_cache(maxsize=64)
def bounds_ints(bounds: tuple[Decimal | None, ...]) -> tuple[int | None, ...]:
    """A segment's bracket bounds x 10^18 (a few distinct tuples per product)."""
    return tuple(None if b is None else to_int(b, _HALF) for b in bounds)


def top_bracket(principal: int, bounds: Sequence[int | None]) -> tuple[int, int]:
    """Where ``principal`` (x 10^18) ends among the brackets (bounds x 10^18): the index
    ``j`` of its highest bracket and the amount ``r`` in it; every bracket below ``j`` is
    full. So its APR-hours over a span are ``fill[j] + r x apr_hours[j]`` with ``fill[j]``
    the full brackets' share, the same for every position (``bracket_spans``). (0, 0):
    no principal."""
    lower = 0
    for j, up in enumerate(bounds):
        if principal <= lower:
            return j, 0
        if up is None or principal < up:
            return j, principal - lower
        lower = up
    if not bounds:
        return 0, 0
    # Above a last bound that is not open-ended: every bracket full.
    last = len(bounds) - 1
    below = bounds[last - 1] if last else 0
    assert below is not None
    return last, lower - below


def bracket_spans(apr_hours: Sequence[int], bounds: Sequence[int | None]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(fill, apr_hours) for ``top_bracket``: ``fill[j]`` the units of the full brackets
    below ``j`` over a span whose per-bracket APR-hours (x 10^18) are ``apr_hours``; both
    padded with a 0 so that j = 0 works without brackets."""
    fill, total, lower = [0], 0, 0
    for up, hours in zip(bounds, apr_hours):
        if up is None:
            break
        total += (up - lower) * hours
        fill.append(total)
        lower = up
    return tuple(fill) + (0,) * (len(apr_hours) + 1 - len(fill)), tuple(apr_hours) + (0,)


def bracket_units(brackets: tuple[int, int], bounds: Sequence[int | None], apr_hours: Sequence[int]) -> int:
    """``fill[j] + r x apr_hours[j]`` for one position (the payout loop inlines it)."""
    fill, hours = bracket_spans(apr_hours, bounds)
    j, r = brackets
    return fill[j] + r * hours[j]


# --------------------------------------------------------------------------- partition


@dataclass(slots=True)
class PartitionState:
    """Per input partition: the watermark (all hours before ``hour`` are closed)."""

    hour: int = 0

    def close_hour(self, hour: int) -> bool:
        if hour <= self.hour:
            return False
        self.hour = hour
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"hour": self.hour}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartitionState:
        return cls(hour=int(data["hour"]))


# --------------------------------------------------------------------------- products


@dataclass(slots=True)
class ProductState:
    asset: str
    index: RateIndex

    def to_dict(self) -> dict[str, Any]:
        return {"asset": self.asset, "index": self.index.to_json()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProductState:
        return cls(asset=data["asset"], index=RateIndex.from_json(data["index"]))


def apply_rates(
    state: ProductState | None, asset: str, effective_hour: int, tiers: Sequence[Tier]
) -> tuple[ProductState, bool]:
    """Upsert the epoch at ``effective_hour``; returns (state, changed)."""
    if state is None:
        state = ProductState(asset=asset, index=RateIndex())
    changed = state.index.set_rates(effective_hour, tiers)
    if asset and state.asset != asset:
        state.asset, changed = asset, True
    return state, changed


@dataclass(frozen=True, slots=True)
class PayoutEntry:
    """One payout request of a product: its boundary and the product's previous one, and
    the number of items per batch it was emitted in."""

    job: str
    period: str
    boundary: int
    previous: int | None
    offset: int
    batch_size: int  # BATCH_SIZE when recorded (LEGACY_BATCH_SIZE before entries kept it)


@dataclass(slots=True)
class PayoutHistory:
    """A product's recent payout requests in one partition, in input order."""

    entries: list[PayoutEntry] = field(default_factory=list)

    def find(self, job: str, period: str) -> PayoutEntry | None:
        for entry in reversed(self.entries):
            if entry.job == job and entry.period == period:
                return entry
        return None

    def record(self, job: str, period: str, boundary: int, offset: int) -> tuple[PayoutEntry | None, str]:
        """The entry of a request and what it is: "new" (recorded now), "replay" (seen
        at this offset: re-emit the same items), "duplicate" (the same request published
        again at another offset: its batches are already complete) or "stale" (not
        after the product's last boundary: everything before it is paid; no entry)."""
        found = self.find(job, period)
        if found is not None:
            return found, "replay" if found.offset == offset else "duplicate"
        previous = max((e.boundary for e in self.entries), default=None)
        if previous is not None and boundary <= previous:
            return None, "stale"
        entry = PayoutEntry(job, period, boundary, previous, offset, BATCH_SIZE)
        self.entries = (self.entries + [entry])[-RECENT_REQUESTS:]
        return entry, "new"

    def boundaries_before(self, offset: int) -> list[int]:
        """The boundaries of the requests before input ``offset`` (the last few)."""
        return [e.boundary for e in self.entries if e.offset < offset][-RECENT_MARKS:]

    def to_list(self) -> list[list[Any]]:
        return [[e.job, e.period, e.boundary, e.previous, e.offset, e.batch_size] for e in self.entries]

    @classmethod
    def from_list(cls, data: Sequence[Sequence[Any]]) -> PayoutHistory:
        """From ``to_list``; an entry stored without its batch size has LEGACY_BATCH_SIZE."""
        return cls([
            PayoutEntry(j, p, int(b), None if prev is None else int(prev), int(o), int(size[0]) if size else LEGACY_BATCH_SIZE)
            for j, p, b, prev, o, *size in data
        ])


# --------------------------------------------------------------------------- positions


@dataclass(slots=True)
class PositionState:
    position_id: str
    product_id: str
    user_id: str
    asset: str
    ledger: PositionLedger = field(default_factory=PositionLedger)
    closed_from_hour: int = 0
    applied_ids: list[str] = field(default_factory=list)
    last_offset: int = -1
    first_offset: int = -1  # the input offset of the event that created it
    # (boundary, paid in all through it in the asset's smallest units, the first hour
    # it earned in as the payout at that boundary saw it), ascending by boundary.
    marks: list[tuple[int, int, int | None]] = field(default_factory=list)
    # Dropped: closed and paid for good. Only the marker remains (ids, offset, marks).
    dropped_at_hour: int | None = None
    dropped_at_offset: int | None = None

    @property
    def dropped(self) -> bool:
        return self.dropped_at_hour is not None

    @property
    def start(self) -> int | None:
        """The first hour the position earns in (None: no principal yet)."""
        return self.ledger.changes[0][0] if self.ledger.changes else None

    def mark_at(self, boundary: int) -> tuple[int, int, int | None] | None:
        for mark in self.marks:
            if mark[0] == boundary:
                return mark
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "position_id": self.position_id,
            "product_id": self.product_id,
            "user_id": self.user_id,
            "asset": self.asset,
            "changes": [[h, str(d)] for h, d in self.ledger.changes],
            "closed_from_hour": self.closed_from_hour,
            "applied_ids": list(self.applied_ids),
            "last_offset": self.last_offset,
            "first_offset": self.first_offset,
            "marks": [list(m) for m in self.marks],
            "dropped_at_hour": self.dropped_at_hour,
            "dropped_at_offset": self.dropped_at_offset,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PositionState:
        return cls(
            position_id=data["position_id"],
            product_id=data["product_id"],
            user_id=data["user_id"],
            asset=data["asset"],
            ledger=PositionLedger(changes=[(int(h), Decimal(d)) for h, d in data["changes"]]),
            closed_from_hour=int(data["closed_from_hour"]),
            applied_ids=list(data["applied_ids"]),
            last_offset=int(data["last_offset"]),
            first_offset=int(data.get("first_offset", -1)),
            marks=[(int(b), int(p), None if s is None else int(s)) for b, p, s in data["marks"]],
            dropped_at_hour=data.get("dropped_at_hour"),
            dropped_at_offset=data.get("dropped_at_offset"),
        )


def units_through(state: PositionState, index: RateIndex | None, hour: int) -> int:
    """E(hour) x 8760 x 10^36: the exact interest of the hours before ``hour``."""
    start = state.start
    if index is None or start is None or hour <= start:
        return 0
    return to_int(path_apr_hours(index, state.ledger.changes, start, hour), UNIT_DIGITS)


@dataclass(frozen=True, slots=True)
class Change:
    effective_hour: int
    delta: Decimal


def already_applied(state: PositionState | None, event_id: str, offset: int) -> bool:
    return state is not None and (offset <= state.last_offset or event_id in state.applied_ids)


def materialize_marks(state: PositionState, index: RateIndex | None, history: PayoutHistory | None, offset: int) -> None:
    """Record what the position was paid through each recent boundary of its product
    (requested before input ``offset``) that it has no mark for, from its history as it
    is now: called before a change is applied, so the amounts are those the payouts
    made. Paid amounts never go down (a debt from a late redemption waits)."""
    if history is None:
        return
    scale = money.scale_of(state.asset, "asset")
    divisor = minor_divisor(scale)
    for boundary in history.boundaries_before(offset):
        if state.marks and boundary <= state.marks[-1][0]:
            continue
        before = state.marks[-1][1] if state.marks else 0
        state.marks.append((boundary, max(before, units_through(state, index, boundary) // divisor), state.start))
    del state.marks[:-RECENT_MARKS]


def apply_position_change(
    state: PositionState | None,
    *,
    event_id: str,
    offset: int,
    position_id: str,
    product_id: str,
    user_id: str,
    asset: str,
    changes: Iterable[Change],
    closed_from_hour: int,
    index: RateIndex | None,
    history: PayoutHistory | None = None,
) -> PositionState | None:
    """The position after a ``PositionChanged``; None when it was already applied (the
    caller writes nothing). A change for a dropped position is refused the same way:
    a closed position does not reopen (Simple Earn opens a new position id)."""
    if already_applied(state, event_id, offset):
        return None
    if state is not None and state.dropped:
        return None
    if state is None:
        state = PositionState(position_id=position_id, product_id=product_id, user_id=user_id, asset=asset, first_offset=offset)
    state.asset = asset or state.asset
    materialize_marks(state, index, history, offset)
    unsettled = _NO_RATES  # never settled: the ledger only merges changes per hour
    for change in sorted(changes, key=lambda c: c.effective_hour):
        state.ledger.apply_change(unsettled, change.effective_hour, change.delta)
    if closed_from_hour:
        state.closed_from_hour = closed_from_hour
    state.user_id = user_id or state.user_id
    state.applied_ids = (state.applied_ids + [event_id])[-RECENT_EVENT_IDS:]
    state.last_offset = offset
    return state


# --------------------------------------------------------------------------- payouts


class Unrecoverable(Exception):
    """A replayed request reaches further back than a position's marks."""


@dataclass(slots=True)
class Position:
    """A position as a payout loop sees it (in memory, derived from ``state``): E at
    its last change hour ``last`` in integer units, so E at any later hour inside the
    same rate segment is ``units + sum(bracket x (cum(hour) - cum(last)))``."""

    state: PositionState
    scale: int
    start: int | None
    last: int
    units: int  # E(last) x 8760 x 10^36
    principal: int  # x 10^18
    closed: bool  # closed and nothing left in it
    rates_version: int
    # Copied from ``state`` (never changed after a view is made: a change makes a new
    # state and a new view), so the payout loop reads one object per position.
    position_id: str = ""
    user_id: str = ""
    first_offset: int = -1
    last_mark: tuple[int, int, int | None] | None = None  # state.marks[-1]
    # Open, started and not a marker: what the payout loop's fast path takes.
    plain: bool = False
    brackets: tuple[Any, int, int] | None = None  # (bounds, top_bracket's j and r)
    # What the last payout in this process left paid in all, and at which boundary.
    memo_boundary: int | None = None
    memo_paid: int = 0


def position_view(state: PositionState, index: RateIndex | None, rates_version: int) -> Position:
    changes = state.ledger.changes
    last = changes[-1][0] if changes else 0
    principal = state.ledger.principal
    closed = bool(state.closed_from_hour) and principal <= 0
    start = state.start
    principal_int = to_int(principal, _HALF)
    # The split of the principal over the latest brackets, ready for the payouts (made
    # here once per change, not once per payout; a payout in other bounds remakes it).
    bounds = index.latest_bounds() if index is not None else None
    return Position(
        state=state,
        scale=money.scale_of(state.asset, "asset"),
        start=start,
        last=last,
        units=units_through(state, index, last),
        principal=principal_int,
        closed=closed,
        rates_version=rates_version,
        position_id=state.position_id,
        user_id=state.user_id,
        first_offset=state.first_offset,
        last_mark=state.marks[-1] if state.marks else None,
        brackets=None if bounds is None else (bounds, *top_bracket(principal_int, bounds_ints(bounds))),
        plain=not closed and start is not None and state.dropped_at_hour is None,
    )


@dataclass(slots=True)
class Paid:
    """A run of positions settled: the items in columns, the markers of positions
    closed and paid for good (to write), expired markers (to delete), and positions a
    replay could not re-emit."""

    position_ids: list[str] = field(default_factory=list)
    user_ids: list[str] = field(default_factory=list)
    amounts: list[str] = field(default_factory=list)
    from_hours: list[int] = field(default_factory=list)
    markers: list[PositionState] = field(default_factory=list)
    expired: list[Position] = field(default_factory=list)
    unrecoverable: list[Position] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Settled:
    """A request's effect on one position, in the asset's smallest units: the amount
    paid, what was paid in all before and after it, and whether it is now closed and
    paid for good."""

    amount: int
    before: int
    after: int
    drop: bool
    start: int | None  # the first hour it earned in, as this request saw it
    from_hour: int  # the first hour the item covers (the previous boundary if it had started by then)


class Payout:
    """One product's payout for one request in one partition: per position, the amount
    (in the asset's smallest units) and the hours it covers. Integer arithmetic on the
    product's cumulative APR-hours at the two boundaries; a position whose last change
    lies in another rate segment (or at or after a boundary) takes the exact path."""

    def __init__(self, product: ProductState, entry: PayoutEntry, offset: int, watermark: int, rates_version: int = 0) -> None:
        self.index = product.index
        self.rates_version = rates_version
        self.entry = entry
        self.offset = offset
        self.watermark = watermark
        self._cum: dict[tuple[int, bool], Any] = {}
        self.end = self._point(entry.boundary, True)
        self.begin = None if entry.previous is None else self._point(entry.previous, True)

    def _point(self, hour: int, end: bool) -> Any:
        key = (hour, end)
        found = self._cum.get(key, False)
        if found is False:
            raw = self.index.cumulative(hour, end=end)
            found = None if raw is None else (raw[0], tuple(to_int(c, _HALF) for c in raw[1]), raw[2])
            self._cum[key] = found
        return found

    def _units_at(self, pos: Position, hour: int, point: Any) -> int:
        """E(hour) in units for ``hour`` >= the position's last change."""
        if hour <= pos.last or pos.start is None:
            return pos.units if hour == pos.last else units_through(pos.state, self.index, hour)
        base = self._point(pos.last, False)
        if base is None or point is None or base[0] != point[0]:
            return units_through(pos.state, self.index, hour)
        bounds = point[2]
        if pos.brackets is None or pos.brackets[0] != bounds:
            pos.brackets = (bounds, *top_bracket(pos.principal, bounds_ints(bounds)))
        _, j, r = pos.brackets
        return pos.units + bracket_units((j, r), bounds_ints(bounds), tuple(b - a for a, b in zip(base[1], point[1])))

    def paid_through(self, pos: Position, hour: int, point: Any) -> int:
        """floor(E(hour)) in the asset's smallest units."""
        if hour < pos.last:
            return units_through(pos.state, self.index, hour) // minor_divisor(pos.scale)
        return self._units_at(pos, hour, point) // minor_divisor(pos.scale)

    def settle(self, pos: Position) -> Settled | None:
        """What this request pays the position; None: nothing to do (not started by
        the boundary, or a marker). Raises ``Unrecoverable``."""
        state, entry = pos.state, self.entry
        boundary, previous = entry.boundary, entry.previous
        marks = state.marks
        if self.offset < state.first_offset:
            return None  # created after this request (a replay with the table ahead)
        if marks and marks[-1][0] >= boundary:
            # Changed (or dropped) after this request: a replay or a duplicate
            # publication; its marks tell what the request paid.
            mark = state.mark_at(boundary)
            if mark is None:
                raise Unrecoverable(state.position_id)
            _, after, start = mark
            if previous is None or start is None or start >= previous:
                before, from_hour = 0, start
            else:
                earlier = state.mark_at(previous)
                if earlier is None:
                    raise Unrecoverable(state.position_id)
                before = earlier[1]
                from_hour = previous if earlier[2] is not None and earlier[2] < previous else start
            return Settled(max(0, after - before), before, after, False, start, self._from(from_hour))
        if state.dropped:
            return None
        closed = pos.closed and state.closed_from_hour <= boundary
        if pos.start is None or pos.start >= boundary:
            # Not earning yet; opened and closed within one hour: it never earned.
            return Settled(0, 0, 0, True, pos.start, boundary) if closed else None
        start = pos.start
        last_mark = marks[-1][1] if marks else 0
        if previous is None:
            before, from_hour = last_mark, start
        elif marks and marks[-1][0] == previous:
            # Changed since the previous payout: its mark tells what that payout saw.
            before = last_mark
            then = marks[-1][2]
            from_hour = previous if then is not None and then < previous else start
        else:
            if pos.memo_boundary == previous:
                before = pos.memo_paid
            else:
                before = max(last_mark, self.paid_through(pos, previous, self.begin))
            from_hour = previous if start < previous else start
        due = self.paid_through(pos, boundary, self.end)
        after = max(before, due)
        pos.memo_boundary, pos.memo_paid = boundary, after
        # Closed and paid through its closing hour (no debt left): forget it.
        return Settled(after - before, before, after, closed and due >= before, start, from_hour)

    def run(self, positions: Iterable[Position], fresh: Any) -> Paid:
        """Settle ``positions`` (in payout order): the items and what to write. The
        common case (unchanged since the previous payout, in the boundary's rate
        segment) is inlined in integers; every other case goes through ``settle``.
        ``fresh(pos)`` returns the position's view, rebuilt if rates changed under it."""
        out = Paid()
        boundary, previous, offset = self.entry.boundary, self.entry.previous, self.offset
        end = self.end
        if end is None:
            positions = [fresh(p) for p in positions]
            for pos in positions:
                self._general(pos, out)
            return out
        end_segment, end_cum, end_bounds = end
        bounds_int = bounds_ints(end_bounds)
        scale = divisor = fmt = None
        # Per last-change hour: ``bracket_spans`` of each tier's APR-hours from it to the
        # boundary (None: the hour is in another rate segment, so the exact path).
        spans: dict[int, tuple[tuple[int, ...], tuple[int, ...]] | None] = {}
        add_id, add_user = out.position_ids.append, out.user_ids.append
        add_amount, add_from = out.amounts.append, out.from_hours.append
        version = self.rates_version
        # The first hour an item covers: the previous boundary for a position that had
        # started by then (every position on the fast path started before this boundary).
        first_at = previous
        for pos in positions:
            if pos.rates_version != version:
                pos = fresh(pos)
            mark = pos.last_mark
            last = pos.last
            # Fast path: plain (open, started, not a marker), unchanged since the previous
            # boundary and before this one, and created before this request.
            if not pos.plain or last >= boundary or offset < pos.first_offset or (mark and (previous is None or mark[0] >= previous)):
                self._general(pos, out)
                continue
            if pos.scale != scale:
                scale = pos.scale
                divisor, fmt = minor_divisor(scale), _formatter(scale)
            if previous is None:
                before = 0
            elif pos.memo_boundary == previous:
                before = pos.memo_paid
            else:
                before = self.paid_through(pos, previous, self.begin)
                if mark and mark[1] > before:
                    before = mark[1]
            span = spans.get(last, False)
            if span is False:
                base = self._point(last, False)
                span = spans[last] = (
                    bracket_spans([b - a for a, b in zip(base[1], end_cum)], bounds_int)
                    if base is not None and base[0] == end_segment
                    else None
                )
            if span is None:
                due = self.paid_through(pos, boundary, end)
            else:
                brackets = pos.brackets
                if brackets is None or (brackets[0] is not end_bounds and brackets[0] != end_bounds):
                    brackets = pos.brackets = (end_bounds, *top_bracket(pos.principal, bounds_int))
                j = brackets[1]
                due = (pos.units + span[0][j] + brackets[2] * span[1][j]) // divisor
            pos.memo_boundary = boundary
            if due > before:
                pos.memo_paid = due
                add_id(pos.position_id)
                add_user(pos.user_id)
                add_amount(fmt(due - before))
                start = pos.start
                add_from(first_at if first_at is not None and start < first_at else start)
            else:
                pos.memo_paid = before
        return out

    def _general(self, pos: Position, out: Paid) -> None:
        try:
            settled = self.settle(pos)
        except Unrecoverable:
            out.unrecoverable.append(pos)
            return
        if settled is None:
            if pos.state.dropped and self.expired(pos.state):
                out.expired.append(pos)
            return
        if settled.amount > 0:
            out.position_ids.append(pos.state.position_id)
            out.user_ids.append(pos.state.user_id)
            out.amounts.append(format_minor(settled.amount, pos.scale))
            out.from_hours.append(settled.from_hour)
        if settled.drop:
            out.markers.append(self.marker(pos, settled))

    def _from(self, hour: int | None) -> int:
        return self.entry.boundary if hour is None else hour

    def marker(self, pos: Position, settled: Settled) -> PositionState:
        """What remains of a position closed and paid for good: its ids, offset and the
        marks this request needs to be re-emitted exactly."""
        state, entry = pos.state, self.entry
        marks = [m for m in state.marks if m[0] < entry.boundary]
        if entry.previous is not None and not any(m[0] == entry.previous for m in marks):
            marks.append((entry.previous, settled.before, settled.start))
        marks.append((entry.boundary, settled.after, settled.start))
        return PositionState(
            position_id=state.position_id,
            product_id=state.product_id,
            user_id=state.user_id,
            asset=state.asset,
            closed_from_hour=state.closed_from_hour,
            applied_ids=list(state.applied_ids),
            last_offset=max(state.last_offset, self.offset),
            first_offset=state.first_offset,
            marks=sorted(marks)[-RECENT_MARKS:],
            dropped_at_hour=entry.boundary,
            dropped_at_offset=self.offset,
        )

    def expired(self, state: PositionState) -> bool:
        assert state.dropped_at_hour is not None and state.dropped_at_offset is not None
        return (
            self.watermark - state.dropped_at_hour >= MARKER_KEEP_HOURS
            and self.offset - state.dropped_at_offset >= MARKER_KEEP_OFFSETS
        )


# --------------------------------------------------------------------------- the book


def _order(position_id: str) -> tuple[int, str]:
    """Payout order: numeric ids ascend as numbers (new positions append at the end)."""
    return len(position_id), position_id


class Book:
    """One partition's positions in memory, per product, as payouts read them: derived
    from the positions table (rebuilt from it after a rebalance), never written back.
    Also tracks, per product, the effective hours of rate changes applied since it was
    built: a view whose E(last) covers an hour whose rates changed is rebuilt.

    A product's positions are kept as one list in payout order, with each id's slot in
    it: a payout walks the list itself (no lookup per position), a change replaces its
    slot, a new id appends (sorted again before the next payout if it came out of
    order), and a removal leaves a hole that the next payout's ``ordered`` closes."""

    def __init__(self) -> None:
        self._lists: dict[str, list[Position | None]] = {}
        self._slots: dict[str, dict[str, int]] = {}
        self._unsorted: set[str] = set()
        self._holes: set[str] = set()
        self.rate_changes: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return sum(len(slots) for slots in self._slots.values())

    def rates_version(self, product_id: str) -> int:
        return len(self.rate_changes.get(product_id, ()))

    def rates_changed(self, product_id: str, effective_hour: int) -> None:
        self.rate_changes.setdefault(product_id, []).append(effective_hour)

    def stale(self, pos: Position) -> bool:
        """Rates changed, since the view was built, for an hour its E(last) covers."""
        changes = self.rate_changes.get(pos.state.product_id)
        if not changes or pos.rates_version >= len(changes):
            return False
        return min(changes[pos.rates_version :]) < pos.last

    def put(self, pos: Position) -> None:
        product_id, position_id = pos.state.product_id, pos.position_id
        slots = self._slots.setdefault(product_id, {})
        positions = self._lists.setdefault(product_id, [])
        slot = slots.get(position_id)
        if slot is not None:
            positions[slot] = pos
            return
        last = positions[-1] if positions else None
        if positions and (last is None or _order(position_id) < _order(last.position_id)):
            self._unsorted.add(product_id)  # out of order, or after a hole: sorted before the next payout
        slots[position_id] = len(positions)
        positions.append(pos)

    def remove(self, product_id: str, position_id: str) -> None:
        slot = self._slots.get(product_id, {}).pop(position_id, None)
        if slot is not None:
            self._lists[product_id][slot] = None
            self._holes.add(product_id)

    def get(self, product_id: str, position_id: str) -> Position | None:
        slot = self._slots.get(product_id, {}).get(position_id)
        return None if slot is None else self._lists[product_id][slot]

    def ordered(self, product_id: str) -> list[Position]:
        """The product's positions in payout order: the book's own list, valid until the
        next ``put`` of a new id or ``remove`` (a payout replaces and removes only
        positions it has settled, behind the part of the list it is reading)."""
        positions = self._lists.get(product_id)
        if positions is None:
            return []
        if product_id in self._holes or product_id in self._unsorted:
            kept = [p for p in positions if p is not None]
            if product_id in self._unsorted:
                kept.sort(key=lambda p: _order(p.position_id))
            positions[:] = kept
            self._slots[product_id] = {p.position_id: i for i, p in enumerate(kept)}
            self._holes.discard(product_id)
            self._unsorted.discard(product_id)
        return positions  # type: ignore[return-value]  # no holes after the above


# --------------------------------------------------------------------------- batches


def batch_key(job: str, period: str, partition: int) -> str:
    return f"{job}:{period}:{partition}"


__all__ = [
    "BATCH_SIZE",
    "LEGACY_BATCH_SIZE",
    "Book",
    "Change",
    "PayoutEntry",
    "PayoutHistory",
    "Payout",
    "Position",
    "PositionState",
    "Settled",
    "Unrecoverable",
    "ProductState",
    "apply_position_change",
    "apply_rates",
    "batch_key",
    "position_view",
    "position_key",
    "product_key",
    "split_position_key",
    "tiers_from_json",
    "tiers_to_json",
    "partition_key",
    "PartitionState",
]
