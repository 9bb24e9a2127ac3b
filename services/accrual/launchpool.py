"""Launchpool rewards in the accrual engine: the pure logic (no faust, no I/O).

The method (the staking-rewards accumulator). A pool pays ``rate = total reward /
(end - start)`` per microsecond between its start and end, split among the stakes by
their share of the pool at that instant. The pool keeps one number, ``acc``: the reward
paid per unit staked since the start. Between two events the pool's stake ``S`` is
constant, so advancing the pool from ``t0`` to ``t1`` adds ``rate x (t1 - t0) / S`` to
``acc`` (nothing is added while ``S`` is 0: that reward is *not distributed*, it is
counted in ``undistributed``). A stake of ``a`` units holding from ``t0`` to ``t1``
earns exactly ``a x (acc(t1) - acc(t0))``. So a stake keeps ``c = accrued - a x acc``
at its last change and its reward through any later time ``t`` is ``E(t) = c + a x
acc(t)``: O(1) per stake change and per hour close, whatever the number of stakers.
The sum over all stakes of what they earn in an interval is ``rate x dt`` exactly (the
shares sum to 1), so the pool never pays more than its total.

Time enters only as event timestamps (stake changes, in microseconds) and hour ticks; the
same input log always gives the same amounts. A pool's events are in time order in its
partition (the Launchpool service serialises a pool's stake changes on the pool's row
and reads the clock after taking it), ticks are watermarks.

Payouts. Each pool records ``acc`` at every hour boundary it crosses. Through a payout at
boundary ``B`` a stake has been paid ``floor(E(B))`` at the reward asset's scale in all,
so a payout at ``B`` after one at ``P`` pays ``floor(E(B)) - floor(E(P))``: the
remainder carries without being stored and the total paid never exceeds the exact
reward (the shortfall per stake is under one unit). A stake that changed after ``B``
(its event arrived before the payout request) answers from a *segment*: its state as it
was before the change, kept whenever a change crosses an hour boundary (so at most one
per hour per stake, pruned once no payout can need it). A payout writes nothing per
stake.

Exactness: every value is an exact rational (``fractions.Fraction``). ``acc``'s
denominator grows with the distinct pool stakes it is divided by; past ``ACC_CAP`` it is
floored to a multiple of ``1 / ACC_CAP`` (never up: rewards can then only be below the
exact value, by less than ``a / ACC_CAP`` per change, and are still never above it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

HOUR_US = 3600 * 1_000_000
ACC_CAP = 10**60
STAKE_SCALE = 18  # stake amounts are held in integer units of 10**-18
STAKE_UNIT = 10**STAKE_SCALE
KEEP_PAYOUTS = 3  # payout requests remembered per pool (replays of these re-emit the same items)
BATCH_SIZE = 5000


def frac(text: str) -> Fraction:
    num, _, den = text.partition("/")
    return Fraction(int(num), int(den or 1))


def frac_text(value: Fraction) -> str:
    return f"{value.numerator}/{value.denominator}" if value.denominator != 1 else str(value.numerator)


def _cap(value: Fraction) -> Fraction:
    if value.denominator <= ACC_CAP:
        return value
    return Fraction((value.numerator * ACC_CAP) // value.denominator, ACC_CAP)


def floor_units(value: Fraction, scale: int) -> int:
    """``value`` in units of ``10**-scale``, rounded down."""
    return (value.numerator * 10**scale) // value.denominator


@dataclass(slots=True)
class PayoutEntry:
    job: str
    period: str
    boundary_hour: int
    offset: int

    def to_list(self) -> list[Any]:
        return [self.job, self.period, self.boundary_hour, self.offset]


@dataclass(slots=True)
class Pool:
    """One reward pool's accumulator (the engine's table value)."""

    pool_id: str
    asset: str  # the reward asset
    scale: int  # its scale
    total: Fraction  # total reward
    start_us: int
    end_us: int
    staked: int = 0  # units of 10**-18
    acc: Fraction = Fraction(0)  # reward per unit (10**-18) staked since the start
    last_us: int = 0
    undistributed: Fraction = Fraction(0)
    boundaries: dict[int, Fraction] = field(default_factory=dict)  # hour -> acc at its start
    payouts: list[PayoutEntry] = field(default_factory=list)
    last_offset: int = -1  # the last of the pool's own events applied (config, stakes)

    @property
    def start_hour(self) -> int:
        return self.start_us // HOUR_US

    @property
    def end_hour(self) -> int:
        return self.end_us // HOUR_US

    def rate(self) -> Fraction:
        return self.total / (self.end_us - self.start_us)

    def _step(self, to: int) -> None:
        lo, hi = max(self.last_us, self.start_us), min(to, self.end_us)
        if hi > lo:
            reward = self.rate() * (hi - lo)
            if self.staked > 0:
                self.acc = _cap(self.acc + reward / self.staked)
            else:
                self.undistributed += reward
        self.last_us = max(self.last_us, to)

    def advance(self, to: int) -> None:
        """Move the pool's time to ``to`` (µs), recording ``acc`` at each hour boundary
        crossed in [start, end]. A time not after the pool's is a no-op."""
        if to <= self.last_us:
            return
        first = max(self.last_us // HOUR_US + 1, self.start_hour)
        last = min(to // HOUR_US, self.end_hour)
        for hour in range(first, last + 1):
            self._step(hour * HOUR_US)
            self.boundaries[hour] = self.acc
        self._step(to)

    def acc_at(self, hour: int) -> Fraction:
        """``acc`` at the hour boundary ``hour`` (the end's after the end: nothing accrues)."""
        hour = min(hour, self.end_hour)
        found = self.boundaries.get(hour)
        if found is None:
            if hour <= self.start_hour:
                return Fraction(0)
            raise KeyError(f"pool {self.pool_id}: no accumulator recorded at hour {hour}")
        return found

    def keep_from_hour(self) -> int:
        """The oldest boundary a payout may still need (the previous boundary of the
        oldest remembered payout)."""
        if not self.payouts:
            return self.start_hour
        oldest = self.payouts[0]
        return self.previous_boundary(oldest) or self.start_hour

    def previous_boundary(self, entry: PayoutEntry) -> int | None:
        before = None
        for e in self.payouts:
            if e is entry:
                return before
            before = e.boundary_hour
        return before

    def record_payout(self, job: str, period: str, boundary_hour: int, offset: int) -> tuple[PayoutEntry | None, str]:
        """("new" | "replay" | "duplicate" | "stale"). A new entry is remembered (the
        oldest beyond ``KEEP_PAYOUTS`` forgotten, with the boundaries only it needed)."""
        for e in self.payouts:
            if e.job == job and e.period == period:
                return e, ("replay" if e.offset == offset else "duplicate")
        if self.payouts and boundary_hour <= self.payouts[-1].boundary_hour:
            return None, "stale"
        if boundary_hour <= self.start_hour:
            return None, "stale"
        entry = PayoutEntry(job, period, boundary_hour, offset)
        self.payouts.append(entry)
        del self.payouts[:-KEEP_PAYOUTS]
        keep = self.keep_from_hour()
        for hour in [h for h in self.boundaries if h < keep]:
            del self.boundaries[hour]
        return entry, "new"

    def to_dict(self) -> dict[str, Any]:
        return {
            "p": self.pool_id, "a": self.asset, "s": self.scale, "t": frac_text(self.total), "b": self.start_us, "e": self.end_us,
            "k": self.staked, "c": frac_text(self.acc), "l": self.last_us, "u": frac_text(self.undistributed),
            "h": {str(h): frac_text(v) for h, v in self.boundaries.items()}, "y": [e.to_list() for e in self.payouts], "o": self.last_offset,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pool:
        return cls(
            d["p"], d["a"], d["s"], frac(d["t"]), d["b"], d["e"], d["k"], frac(d["c"]), d["l"], frac(d["u"]),
            {int(h): frac(v) for h, v in d["h"].items()}, [PayoutEntry(*e) for e in d["y"]], d["o"],
        )


@dataclass(slots=True)
class Segment:
    """A stake's state during [from_us, until_us]: E(t) = c + units x acc(t)."""

    from_us: int
    until_us: int
    units: int
    c: Fraction


@dataclass(slots=True)
class Stake:
    """One user's stake in one pool (the engine's table value)."""

    stake_id: str
    user_id: str
    created_us: int
    last_us: int
    units: int = 0
    c: Fraction = Fraction(0)  # accrued - units x acc, at the last change
    segments: list[Segment] = field(default_factory=list)
    last_offset: int = -1

    def reward(self, acc: Fraction) -> Fraction:
        """E: the exact reward earned from the start through the time at which the pool's
        accumulator was ``acc`` (valid while the stake is in its current state)."""
        return self.c + self.units * acc

    def state_at(self, us: int) -> tuple[int, Fraction] | None:
        """(units, c) of the state that held at time ``us``; None before the stake existed."""
        if us >= self.last_us:
            return self.units, self.c
        if us <= self.created_us:
            return None
        for seg in reversed(self.segments):
            if seg.from_us <= us <= seg.until_us:
                return seg.units, seg.c
        raise KeyError(f"stake {self.stake_id}: no state kept for time {us}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "i": self.stake_id, "u": self.user_id, "f": self.created_us, "l": self.last_us, "n": self.units, "c": frac_text(self.c),
            "g": [[s.from_us, s.until_us, s.units, frac_text(s.c)] for s in self.segments], "o": self.last_offset,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stake:
        return cls(d["i"], d["u"], d["f"], d["l"], d["n"], frac(d["c"]), [Segment(a, b, n, frac(c)) for a, b, n, c in d["g"]], d["o"])


def to_units(amount: Fraction) -> int:
    units = amount * STAKE_UNIT
    if units.denominator != 1:
        raise ValueError(f"stake amount {amount} has more than {STAKE_SCALE} fraction digits")
    return int(units)


def apply_stake_change(pool: Pool, stake: Stake | None, *, stake_id: str, user_id: str, delta_units: int, at_us: int, offset: int) -> Stake | None:
    """Apply one stake change at ``at_us`` (µs) to the pool and the stake (both mutated;
    the stake is created when None). Returns the stake, or None when the change was
    applied before (its offset is not after the pool's last one). A time before the
    pool's (cannot happen with a pool's serialised writes) is taken as the pool's time.
    Refuses (ValueError) a change that would make the stake negative."""
    if offset <= pool.last_offset:
        return None
    at_us = max(at_us, pool.last_us)
    pool.advance(at_us)
    if stake is None:
        stake = Stake(stake_id, user_id, at_us, at_us)
    if stake.units + delta_units < 0:
        raise ValueError(f"stake {stake_id}: change {delta_units} below zero (has {stake.units})")
    if at_us // HOUR_US > stake.last_us // HOUR_US:
        # An hour boundary lies in (last change, now]: keep the old state for payouts at it.
        stake.segments.append(Segment(stake.last_us, at_us, stake.units, stake.c))
    accrued = stake.reward(pool.acc)
    stake.units += delta_units
    stake.c = accrued - stake.units * pool.acc
    stake.last_us = at_us
    keep_us = pool.keep_from_hour() * HOUR_US
    if stake.segments and stake.segments[0].until_us < keep_us:
        stake.segments = [s for s in stake.segments if s.until_us >= keep_us]
    stake.last_offset = offset
    pool.staked += delta_units
    pool.last_offset = offset
    return stake


def apply_to_pool(pool: Pool, *, delta_units: int, at_us: int, offset: int) -> None:
    """The pool's part of :func:`apply_stake_change` alone: for a change whose stake side
    is already applied (the engine wrote the stake and lost the pool's write in a crash).
    Applying both parts in turn gives exactly the state of one full application."""
    if offset <= pool.last_offset:
        return
    at_us = max(at_us, pool.last_us)
    pool.advance(at_us)
    pool.staked += delta_units
    pool.last_offset = offset


def claimable(pool: Pool, stake: Stake, at_us: int) -> Fraction:
    """The exact reward a stake has earned through ``at_us`` (not before the pool's time),
    paid or not: the pool is advanced on a copy."""
    probe = Pool.from_dict(pool.to_dict())
    probe.advance(at_us)
    return stake.reward(probe.acc)


def reward_through(pool: Pool, stake: Stake, hour: int) -> Fraction:
    """E at the hour boundary ``hour`` (exact)."""
    state = stake.state_at(hour * HOUR_US)
    if state is None:
        return Fraction(0)
    units, c = state
    return c + units * pool.acc_at(hour)


@dataclass(slots=True)
class Paid:
    stake_ids: list[str] = field(default_factory=list)
    user_ids: list[str] = field(default_factory=list)
    amounts: list[str] = field(default_factory=list)
    units: int = 0  # the sum, in units of the reward asset


def _floor_at(units: int, c: Fraction, acc: Fraction, scale_pow: int) -> int:
    # floor((c + units x acc) x 10**scale) with integers: c = m/n, acc = p/q.
    m, n, p, q = c.numerator, c.denominator, acc.numerator, acc.denominator
    return ((m * q + units * p * n) * scale_pow) // (n * q)


def pay(pool: Pool, entry: PayoutEntry, stakes: Iterable[Stake]) -> Iterator[tuple[Stake, int]]:
    """(stake, amount in units of the reward asset > 0) for a payout at ``entry``:
    floor(E(B)) - floor(E(P)), P the boundary of the pool's payout before it."""
    boundary = entry.boundary_hour
    previous = pool.previous_boundary(entry)
    scale_pow = 10**pool.scale
    acc_b = pool.acc_at(boundary)
    acc_p = pool.acc_at(previous) if previous is not None else None
    b_us = boundary * HOUR_US
    p_us = previous * HOUR_US if previous is not None else 0
    for stake in stakes:
        if stake.created_us >= b_us:
            continue
        if stake.last_us <= b_us:
            units, c = stake.units, stake.c
        else:
            state = stake.state_at(b_us)
            if state is None:
                continue
            units, c = state
        owed = _floor_at(units, c, acc_b, scale_pow)
        if acc_p is not None and stake.created_us < p_us:
            if stake.last_us <= p_us:
                pu, pc = stake.units, stake.c
            else:
                state = stake.state_at(p_us)
                pu, pc = state if state is not None else (0, Fraction(0))
            owed -= _floor_at(pu, pc, acc_p, scale_pow)
        if owed > 0:
            yield stake, owed


def format_units(units: int, scale: int) -> str:
    """An integer count of 10**-scale as a canonical decimal string (> 0)."""
    if scale == 0:
        return str(units)
    whole, frac_part = divmod(units, 10**scale)
    text = f"{whole}.{frac_part:0{scale}d}".rstrip("0").rstrip(".")
    return text

