"""Launchpool rewards in the accrual engine: the pure logic (no faust, no I/O).

The method (the product rule, PRODUCT_RULES.md): the reward of hour ``h`` of a pool,
``R_h = total / number of hours in the project`` (for an hour only partly inside the
project, its share of the project's duration), is split by the *time-weighted average
stake of the hour*: a stake earns ``R_h x I_s(h) / I_pool(h)``, where ``I(h)`` is the
integral of the stake over the hour (in units of 10**-18 x µs; the average is ``I / 1 h``,
and the hour cancels). The reward of an hour whose pool integral is 0 is *not
distributed* (counted in ``undistributed``). The rule's ratio depends on the whole
hour, so a stake's reward for an hour is known once the hour closes.

Cost, O(1) per stake change and per hour close (amortised), a payout one pass:

- The pool keeps ``acc`` = A, the sum over its closed hours of ``R_h / I_pool(h)``,
  advanced once per hour close, and ``integral``, its stake's integral over the current
  hour so far (``+= staked x dt`` at every change: O(1)).
- A stake constant over hour ``h`` earns ``R_h x units x 1 h / I_pool(h)`` = ``units x 1 h
  x (A(h+1) - A(h))``; so a stake that has not changed since the start of hour ``k+1`` has
  earned through a later boundary ``B``: ``E(B) = d + units x 1 h x (A(B) - a)``, ``d`` its
  reward through ``k+1`` and ``a = A(k+1)``.
- A stake that changed during hour ``k`` (an *open* stake) keeps ``c`` = its reward
  through the start of hour ``k``, and ``w`` = its integral from the start of the hour to
  its last change. When hour ``k`` closes it is *settled*, exactly: ``d = c + (w + units x
  (end of hour - last change)) x R_k / I_pool(k)``, ``a = A(k+1)``. Only the stakes
  changed in the closing hour are touched (the ``Book`` indexes open stakes by hour):
  O(changes of the hour) at the close, O(1) amortised per change. The settled stakes are
  written (before the pool) by the engine.

Time enters only as event timestamps (stake changes, in microseconds) and hour ticks; the
same input log always gives the same amounts. A pool's events are in time order in its
partition (the Launchpool service serialises a pool's stake changes on the pool's row
and reads the clock after taking it), ticks are watermarks.

Payouts. Each pool records ``acc`` at every hour boundary it crosses. Through a payout at
boundary ``B`` a stake has been paid ``floor(E(B))`` at the reward asset's scale in all,
so a payout at ``B`` after one at ``P`` pays ``floor(E(B)) - floor(E(P))``: the
remainder carries without being stored and the total paid never exceeds the exact
reward (the shortfall per stake is under one unit). A stake that changed after ``B``
(its event arrived before the payout request) answers from a *segment*: its settled
state as it was before the change, kept whenever a change crosses an hour boundary (so
at most one per hour per stake, pruned once no payout can need it). A payout writes
nothing per stake.

Exactness: every value is an exact rational (``fractions.Fraction``). ``acc``'s
denominator grows with the distinct hourly pool integrals it is divided by (once per
hour, not per change); past ``ACC_CAP`` it (and a stake's ``c`` and ``d``) is floored to a
multiple of ``1 / ACC_CAP`` (never up: rewards can then only be below the exact value,
by less than ``units x 1 h / ACC_CAP`` per hour, and are still never above it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from services.accrual.domain import RECENT_EVENT_IDS

HOUR_US = 3600 * 1_000_000
ACC_CAP = 10**240  # past it, A and a stake's rewards are floored to multiples of 10**-240 (see above)
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
    acc: Fraction = Fraction(0)  # A: sum over closed hours of R_h / I_pool(h)
    last_us: int = 0
    undistributed: Fraction = Fraction(0)
    boundaries: dict[int, Fraction] = field(default_factory=dict)  # hour -> A at its start
    payouts: list[PayoutEntry] = field(default_factory=list)
    last_offset: int = -1  # the last of the pool's own events applied (config, stakes)
    integral: int = 0  # the pool's stake integral from the start of last_us's hour to last_us

    @property
    def start_hour(self) -> int:
        return self.start_us // HOUR_US

    @property
    def end_hour(self) -> int:
        return self.end_us // HOUR_US

    def hour_reward(self, hour: int) -> Fraction:
        """R_h: total / number of hours in the project, for an hour inside it (an hour
        partly inside: its share of the project's duration); 0 outside."""
        lo, hi = max(hour * HOUR_US, self.start_us), min((hour + 1) * HOUR_US, self.end_us)
        if hi <= lo:
            return Fraction(0)
        return self.total * (hi - lo) / (self.end_us - self.start_us)

    def acc_at(self, hour: int) -> Fraction:
        """A at the hour boundary ``hour`` (the end's after the end: nothing accrues)."""
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
            "i": self.integral,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pool:
        return cls(
            d["p"], d["a"], d["s"], frac(d["t"]), d["b"], d["e"], d["k"], frac(d["c"]), d["l"], frac(d["u"]),
            {int(h): frac(v) for h, v in d["h"].items()}, [PayoutEntry(*e) for e in d["y"]], d["o"], d.get("i", 0),
        )


@dataclass(slots=True)
class Segment:
    """A stake's settled state during (from_us, until_us]: E(B) = d + units x 1 h x (A(B) - a)."""

    from_us: int
    until_us: int
    units: int
    d: Fraction
    a: Fraction


@dataclass(slots=True)
class Stake:
    """One user's stake in one pool (the engine's table value). Its last change was in
    hour k = last_us // 1 h: ``c`` is its reward through the start of hour k and ``w`` its
    integral from that start to the change; once hour k is closed (settled) ``d`` is its
    reward through k + 1 and ``a`` the pool's A there (``d`` is None while open).
    ``applied`` holds the event ids of its last changes: the outbox relay publishes again
    what a crash kept it from marking done, at later offsets."""

    stake_id: str
    user_id: str
    created_us: int
    last_us: int
    units: int = 0
    c: Fraction = Fraction(0)
    segments: list[Segment] = field(default_factory=list)
    last_offset: int = -1
    w: int = 0
    d: Fraction | None = None
    a: Fraction = Fraction(0)
    applied: list[str] = field(default_factory=list)

    @property
    def hour(self) -> int:
        return self.last_us // HOUR_US

    def settle(self, x: Fraction, acc: Fraction) -> None:
        """Close the stake's hour: ``x`` = R_k / I_pool(k) (0 when nothing is distributed),
        ``acc`` = A(k + 1)."""
        share = self.w + self.units * ((self.hour + 1) * HOUR_US - self.last_us)
        self.d = _cap(self.c + share * x)
        self.a = acc

    def state_at(self, us: int) -> tuple[int, Fraction, Fraction] | None:
        """(units, base, snapshot) at the hour boundary ``us``: E = base + units x 1 h x
        (A - snapshot); None before the stake existed."""
        if us >= self.last_us:
            if us == self.last_us:
                return 0, self.c, Fraction(0)
            if self.d is None:
                raise KeyError(f"stake {self.stake_id}: hour {self.hour} not settled")
            return self.units, self.d, self.a
        if us <= self.created_us:
            return None
        for seg in reversed(self.segments):
            if seg.from_us < us <= seg.until_us:
                return seg.units, seg.d, seg.a
        raise KeyError(f"stake {self.stake_id}: no state kept for time {us}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "i": self.stake_id, "u": self.user_id, "f": self.created_us, "l": self.last_us, "n": self.units, "c": frac_text(self.c),
            "g": [[s.from_us, s.until_us, s.units, frac_text(s.d), frac_text(s.a)] for s in self.segments], "o": self.last_offset,
            "w": self.w, "d": None if self.d is None else frac_text(self.d), "a": frac_text(self.a), "x": self.applied,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stake:
        return cls(
            d["i"], d["u"], d["f"], d["l"], d["n"], frac(d["c"]), [Segment(a, b, n, frac(x), frac(y)) for a, b, n, x, y in d["g"]], d["o"],
            d["w"], None if d["d"] is None else frac(d["d"]), frac(d["a"]), list(d.get("x", ())),
        )


class Book:
    """A pool's stakes in memory, with its open stakes (changed in a not yet closed hour)
    indexed by hour: derived state, rebuilt from the stakes."""

    __slots__ = ("stakes", "open")

    def __init__(self, stakes: Iterable[Stake] = ()) -> None:
        self.stakes: dict[str, Stake] = {}
        self.open: dict[int, set[str]] = {}
        for stake in stakes:
            self.add(stake)

    def add(self, stake: Stake) -> None:
        self.stakes[stake.stake_id] = stake
        if stake.d is None:
            self.open.setdefault(stake.hour, set()).add(stake.stake_id)

    def get(self, stake_id: str) -> Stake | None:
        return self.stakes.get(stake_id)

    def values(self) -> Iterable[Stake]:
        return self.stakes.values()

    def __len__(self) -> int:
        return len(self.stakes)

    def settle(self, hour: int, x: Fraction, acc: Fraction) -> list[Stake]:
        """Settle the stakes open in ``hour`` (closed now), in id order."""
        ids = self.open.pop(hour, None)
        if not ids:
            return []
        out = []
        for stake_id in sorted(ids):
            stake = self.stakes[stake_id]
            if stake.d is None and stake.hour == hour:
                stake.settle(x, acc)
                out.append(stake)
        return out


def advance(pool: Pool, book: Book, to: int) -> list[Stake]:
    """Move the pool's time to ``to`` (µs): every hour closed on the way adds R_h / I_pool(h)
    to A (or R_h to ``undistributed`` when I_pool(h) is 0), records A at the boundaries in
    (start, end], and settles the stakes open in it. Returns the settled stakes (to be
    written before the pool). A time not after the pool's is a no-op."""
    settled: list[Stake] = []
    if to <= pool.last_us:
        return settled
    target = to // HOUR_US
    while pool.last_us // HOUR_US < target:
        hour = pool.last_us // HOUR_US
        boundary = (hour + 1) * HOUR_US
        integral = pool.integral + pool.staked * (boundary - pool.last_us)
        reward = pool.hour_reward(hour)
        x = Fraction(0)
        if reward:
            if integral > 0:
                x = reward / integral
                pool.acc = _cap(pool.acc + x)
            else:
                pool.undistributed += reward
        pool.last_us, pool.integral = boundary, 0
        if pool.start_hour < hour + 1 <= pool.end_hour:
            pool.boundaries[hour + 1] = pool.acc
        settled += book.settle(hour, x, pool.acc)
        if boundary >= pool.end_us and target > hour + 1:
            # Nothing accrues after the end: the hours up to ``to`` close at once.
            for h in sorted(h for h in book.open if h < target):
                settled += book.settle(h, Fraction(0), pool.acc)
            pool.last_us = target * HOUR_US
    pool.integral += pool.staked * (to - pool.last_us)
    pool.last_us = to
    return settled


def to_units(amount: Fraction) -> int:
    units = amount * STAKE_UNIT
    if units.denominator != 1:
        raise ValueError(f"stake amount {amount} has more than {STAKE_SCALE} fraction digits")
    return int(units)


def apply_stake_change(
    pool: Pool, book: Book, *, stake_id: str, user_id: str, delta_units: int, at_us: int, offset: int, event_id: str
) -> list[Stake] | None:
    """Apply one stake change at ``at_us`` (µs) to the pool and the book (both mutated; the
    stake is created when missing). Returns the stakes to write, in order (those the hours
    closed on the way settled, then the changed one), before the pool; None when the change
    was applied before: its offset is not after the pool's last one, or the event was
    published again at a later offset (its id is among the stake's last ones; nothing is
    mutated). A stake whose record of this change is already there (written, the pool's
    write lost) gets only the pool's part. A time before the pool's (cannot happen with a
    pool's serialised writes) is taken as the pool's time. Refuses (ValueError, nothing
    mutated) a change that would make the stake negative."""
    if offset <= pool.last_offset:
        return None
    stake = book.get(stake_id)
    at_us = max(at_us, pool.last_us)
    if stake is not None and stake.last_offset >= offset:
        settled = advance(pool, book, at_us)
        pool.staked += delta_units
        pool.last_offset = offset
        return settled
    if stake is not None and event_id in stake.applied:
        return None
    if (stake.units if stake is not None else 0) + delta_units < 0:
        raise ValueError(f"stake {stake_id}: change {delta_units} below zero (has {stake.units if stake else 0})")
    settled = advance(pool, book, at_us)
    hour = at_us // HOUR_US
    if stake is None:
        stake = Stake(stake_id, user_id, at_us, at_us)
    elif hour > stake.hour:
        # An hour boundary lies in (last change, now]: the stake's hour is settled; keep
        # that state for payouts at the boundaries in between.
        assert stake.d is not None, stake.stake_id
        stake.segments.append(Segment(stake.last_us, at_us, stake.units, stake.d, stake.a))
        stake.c = _cap(stake.d + stake.units * HOUR_US * (pool.acc - stake.a))
        stake.w = stake.units * (at_us - hour * HOUR_US)
        stake.d, stake.a = None, Fraction(0)
    else:
        stake.w += stake.units * (at_us - stake.last_us)
    stake.units += delta_units
    stake.last_us = at_us
    keep_us = pool.keep_from_hour() * HOUR_US
    if stake.segments and stake.segments[0].until_us < keep_us:
        stake.segments = [s for s in stake.segments if s.until_us >= keep_us]
    stake.last_offset = offset
    stake.applied = (stake.applied + [event_id])[-RECENT_EVENT_IDS:]
    book.add(stake)
    pool.staked += delta_units
    pool.last_offset = offset
    return [s for s in settled if s is not stake] + [stake]


def reward_through(pool: Pool, stake: Stake, hour: int) -> Fraction:
    """E at the hour boundary ``hour`` (exact; the pool has closed the hours before it)."""
    state = stake.state_at(hour * HOUR_US)
    if state is None:
        return Fraction(0)
    units, base, snap = state
    return base + units * HOUR_US * (pool.acc_at(hour) - snap) if units else base


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


class _Floors:
    """floor(E) at one boundary for many stakes: A(B) - snapshot computed once per
    distinct snapshot."""

    def __init__(self, acc: Fraction, scale_pow: int) -> None:
        self.acc, self.scale_pow = acc, scale_pow
        self.diffs: dict[tuple[int, int], Fraction] = {}

    def __call__(self, state: tuple[int, Fraction, Fraction]) -> int:
        units, base, snap = state
        if not units:
            return (base.numerator * self.scale_pow) // base.denominator
        key = (snap.numerator, snap.denominator)  # (a Fraction's own hash is a modular inverse)
        diff = self.diffs.get(key)
        if diff is None:
            diff = self.diffs[key] = self.acc - snap
        return _floor_at(units * HOUR_US, base, diff, self.scale_pow)


def pay(pool: Pool, entry: PayoutEntry, stakes: Iterable[Stake]) -> Iterator[tuple[Stake, int]]:
    """(stake, amount in units of the reward asset > 0) for a payout at ``entry``:
    floor(E(B)) - floor(E(P)), P the boundary of the pool's payout before it."""
    boundary = entry.boundary_hour
    previous = pool.previous_boundary(entry)
    scale_pow = 10**pool.scale
    at_b = _Floors(pool.acc_at(boundary), scale_pow)
    at_p = _Floors(pool.acc_at(previous), scale_pow) if previous is not None else None
    b_us = boundary * HOUR_US
    p_us = previous * HOUR_US if previous is not None else 0
    for stake in stakes:
        if stake.created_us >= b_us:
            continue
        state = stake.state_at(b_us)
        if state is None:
            continue
        owed = at_b(state)
        if at_p is not None and stake.created_us < p_us:
            before = stake.state_at(p_us)
            if before is not None:
                owed -= at_p(before)
        if owed > 0:
            yield stake, owed


def format_units(units: int, scale: int) -> str:
    """An integer count of 10**-scale as a canonical decimal string (> 0)."""
    if scale == 0:
        return str(units)
    whole, frac_part = divmod(units, 10**scale)
    text = f"{whole}.{frac_part:0{scale}d}".rstrip("0").rstrip(".")
    return text
