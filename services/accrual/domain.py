"""The accrual engine's state transitions, pure: no faust, no Kafka, no protobuf.

State of one input partition (the faust app keeps it in changelog-backed tables):

- per product: its ``RateIndex`` (the same in every partition: each partition sees the
  same ordered ``ProductRatesSet`` facts) and its asset;
- the partition's watermark: the last ``HourClosed`` hour;
- per position: a ``PositionState`` (identity, ``PositionLedger``, closing hour, the
  ids of recently applied events, the input offset of the last event applied to it,
  and its recent payouts).

Redelivery (faust at-least-once, or a duplicate from the upstream outbox relay) is made
harmless per record:

- a ``PositionChanged`` is skipped when its offset is <= the position's last applied
  offset (a faust replay after a crash: the table may be ahead of the committed offset)
  or its event id is among the position's recent ids (a duplicate publication);
- a ``ProductRatesSet`` is an upsert of the epoch at its hour: applying it again is a
  no-op;
- an ``HourClosed`` only moves the watermark forward;
- a ``PayoutRequested`` finds, per position, the payout it already made for the same
  (job, period) and re-emits exactly that item; positions dropped after being fully
  paid leave a small marker with their last payouts and event ids, so a replay neither
  resurrects them nor loses their item.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from services.kernel import money
from services.kernel.interest import PositionLedger, RateIndex, Tier, tiers_from_json, tiers_to_json

RECENT_EVENT_IDS = 64  # per position: ids of the last applied PositionChanged events
RECENT_PAYOUTS = 8  # per position: the last payouts, re-emitted on a replayed request
BATCH_SIZE = 5000  # PayoutItems per PayoutBatch
CARRY_DISPLAY_DIGITS = 30  # fraction digits of the carry shown in a PayoutItem
# A dropped position's marker is purged once it is this old both in event hours and in
# input offsets of its partition: far beyond any replay window of an at-least-once commit.
MARKER_KEEP_HOURS = 24 * 7
MARKER_KEEP_OFFSETS = 100_000


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


# --------------------------------------------------------------------------- partition


RECENT_REQUESTS = 64  # per partition: (job, period) -> offset of the payout requests seen


@dataclass(slots=True)
class PartitionState:
    """Per input partition: the watermark (all hours before ``hour`` are closed) and the
    offsets of recent payout requests, to tell a replay (same offset: finish the work)
    from a duplicate publication (another offset: only re-emit what was paid)."""

    hour: int = 0
    requests: list[tuple[str, str, int]] = field(default_factory=list)

    def close_hour(self, hour: int) -> bool:
        if hour <= self.hour:
            return False
        self.hour = hour
        return True

    def register_request(self, job: str, period: str, offset: int) -> tuple[bool, bool]:
        """Returns (duplicate, changed): ``duplicate`` when the same (job, period) was
        requested before at another offset."""
        for j, p, o in self.requests:
            if j == job and p == period:
                return o != offset, False
        self.requests = (self.requests + [(job, period, offset)])[-RECENT_REQUESTS:]
        return False, True

    def to_dict(self) -> dict[str, Any]:
        return {"hour": self.hour, "requests": [list(r) for r in self.requests]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartitionState:
        return cls(hour=int(data["hour"]), requests=[(j, p, int(o)) for j, p, o in data.get("requests", [])])


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


# --------------------------------------------------------------------------- positions


@dataclass(frozen=True, slots=True)
class PayoutRecord:
    job: str
    period: str
    boundary_hour: int
    amount: Decimal
    carry: Decimal
    from_hour: int

    def to_list(self) -> list[Any]:
        return [self.job, self.period, self.boundary_hour, str(self.amount), str(self.carry), self.from_hour]

    @classmethod
    def from_list(cls, data: Sequence[Any]) -> PayoutRecord:
        job, period, boundary, amount, carry, from_hour = data
        return cls(job, period, int(boundary), Decimal(amount), Decimal(carry), int(from_hour))


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
    payouts: list[PayoutRecord] = field(default_factory=list)
    # Dropped: closed and fully paid. Only the marker remains (ids, offset, payouts).
    dropped_at_hour: int | None = None
    dropped_at_offset: int | None = None

    @property
    def dropped(self) -> bool:
        return self.dropped_at_hour is not None

    def payout_for(self, job: str, period: str) -> PayoutRecord | None:
        for record in self.payouts:
            if record.job == job and record.period == period:
                return record
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "position_id": self.position_id,
            "product_id": self.product_id,
            "user_id": self.user_id,
            "asset": self.asset,
            "ledger": self.ledger.to_dict(),
            "closed_from_hour": self.closed_from_hour,
            "applied_ids": list(self.applied_ids),
            "last_offset": self.last_offset,
            "payouts": [p.to_list() for p in self.payouts],
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
            ledger=PositionLedger.from_dict(data["ledger"]),
            closed_from_hour=int(data["closed_from_hour"]),
            applied_ids=list(data["applied_ids"]),
            last_offset=int(data["last_offset"]),
            payouts=[PayoutRecord.from_list(p) for p in data["payouts"]],
            dropped_at_hour=data.get("dropped_at_hour"),
            dropped_at_offset=data.get("dropped_at_offset"),
        )


@dataclass(frozen=True, slots=True)
class Change:
    effective_hour: int
    delta: Decimal


def already_applied(state: PositionState | None, event_id: str, offset: int) -> bool:
    return state is not None and (offset <= state.last_offset or event_id in state.applied_ids)


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
) -> PositionState | None:
    """The position after a ``PositionChanged``; None when it was already applied (the
    caller writes nothing). A change for a dropped position is refused the same way:
    a closed position does not reopen (Simple Earn opens a new position id)."""
    if already_applied(state, event_id, offset):
        return None
    if state is not None and state.dropped:
        return None
    if state is None:
        state = PositionState(position_id=position_id, product_id=product_id, user_id=user_id, asset=asset)
    index = index or RateIndex()
    for change in sorted(changes, key=lambda c: c.effective_hour):
        state.ledger.apply_change(index, change.effective_hour, change.delta)
    if closed_from_hour:
        state.closed_from_hour = closed_from_hour
    state.user_id = user_id or state.user_id
    state.asset = asset or state.asset
    state.applied_ids = (state.applied_ids + [event_id])[-RECENT_EVENT_IDS:]
    state.last_offset = offset
    return state


@dataclass(frozen=True, slots=True)
class PayoutResult:
    """What a payout request does to one position: the item to emit (None: nothing),
    the state to write (None: unchanged), and whether to delete the record."""

    item: PayoutRecord | None
    state: PositionState | None
    delete: bool = False


def payout_position(
    state: PositionState,
    index: RateIndex | None,
    *,
    job: str,
    period: str,
    boundary_hour: int,
    offset: int,
    watermark: int,
    duplicate: bool = False,
) -> PayoutResult:
    """Pay one position for (job, period) up to ``boundary_hour``.

    The same request again (a replay, or a duplicate publication) re-emits the item it
    made the first time; a duplicate publication pays no position that the original did
    not. A position with nothing accrued and nothing carried, or one that
    starts after the boundary, gets no item."""
    previous = state.payout_for(job, period)
    if previous is not None:
        return PayoutResult(previous, None)
    if duplicate:
        # The same request published again later: pay nothing new under its name (its
        # batches were already complete); what accrued since goes to the next payout.
        return PayoutResult(None, None)
    if state.dropped:
        if _marker_expired(state, offset=offset, watermark=watermark):
            return PayoutResult(None, None, delete=True)
        return PayoutResult(None, None)
    if offset <= state.last_offset:
        # Applied after this request in the log (the record is ahead of a replay) and the
        # request's item has aged out of the recent payouts: nothing can be re-emitted.
        return PayoutResult(None, None)
    ledger = state.ledger
    started = ledger.settled_through is not None or (ledger.changes and ledger.changes[0][0] < boundary_hour)
    closed = bool(state.closed_from_hour) and state.closed_from_hour <= boundary_hour and ledger.principal <= 0
    if not started and not ledger.accrued_units and not ledger.carry_units:
        if closed:  # opened and closed within one hour: it never earned; forget it
            _drop(state, boundary_hour, offset)
            return PayoutResult(None, state)
        return PayoutResult(None, None)
    scale = money.scale_of(state.asset, "asset")
    taken = ledger.take_payout(index or RateIndex(), boundary_hour, scale)
    record = PayoutRecord(
        job=job,
        period=period,
        boundary_hour=boundary_hour,
        amount=taken.paid,
        carry=money.truncate(taken.carry, CARRY_DISPLAY_DIGITS) if taken.carry > 0 else taken.carry,
        from_hour=taken.from_hour,
    )
    state.payouts = (state.payouts + [record])[-RECENT_PAYOUTS:]
    state.last_offset = offset
    if closed and ledger.accrued_units >= 0:
        _drop(state, boundary_hour, offset)  # closed and paid through its closing hour
    return PayoutResult(record, state)


def _drop(state: PositionState, boundary_hour: int, offset: int) -> None:
    """Keep only the marker: ids, offset and recent payouts (for replays)."""
    state.ledger = PositionLedger(carry_units=state.ledger.carry_units)
    state.dropped_at_hour = boundary_hour
    state.dropped_at_offset = offset
    state.last_offset = offset


def _marker_expired(state: PositionState, *, offset: int, watermark: int) -> bool:
    assert state.dropped_at_hour is not None and state.dropped_at_offset is not None
    return (
        watermark - state.dropped_at_hour >= MARKER_KEEP_HOURS
        and offset - state.dropped_at_offset >= MARKER_KEEP_OFFSETS
    )


# --------------------------------------------------------------------------- batches


def batches(items: Sequence[Any], size: int = BATCH_SIZE) -> Iterator[tuple[int, bool, Sequence[Any]]]:
    """(sequence, last, items) chunks; at least one (empty) chunk, the last flagged."""
    if not items:
        yield 0, True, ()
        return
    count = (len(items) + size - 1) // size
    for seq in range(count):
        yield seq, seq == count - 1, items[seq * size : (seq + 1) * size]


def batch_key(job: str, period: str, partition: int) -> str:
    return f"{job}:{period}:{partition}"


__all__ = [
    "BATCH_SIZE",
    "Change",
    "PayoutRecord",
    "PayoutResult",
    "PositionState",
    "ProductState",
    "apply_position_change",
    "apply_rates",
    "batch_key",
    "batches",
    "payout_position",
    "position_key",
    "product_key",
    "split_position_key",
    "tiers_from_json",
    "tiers_to_json",
    "partition_key",
    "PartitionState",
]
