"""The Launchpool accumulator (services.accrual.launchpool) against a brute-force
reference written here: between consecutive event times the pool pays rate x dt, split
among the stakers by their share at that instant, all in fractions; a payout at boundary
B pays floor(E(B)) - floor(E(previous boundary)) at the reward asset's scale.

Events reach the engine in the order the platform gives them: a pool's stake changes in
time order, hour ticks after every change before them, payout requests after their tick,
and possibly after stake changes of later hours (a late scheduler)."""

from __future__ import annotations

from collections import defaultdict
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from services.accrual import launchpool as lp

H = lp.HOUR_US
START_HOUR = 500_000
SCALE = 8


def reference(total: Fraction, start: int, end: int, changes: list[tuple[int, str, int]], boundaries: list[int]) -> dict[int, dict[str, Fraction]]:
    """E_u(B) for every boundary hour B: the exact reward of each user through B."""
    rate = total / (end - start)
    points = sorted({start, end, *(t for t, _, _ in changes), *(b * H for b in boundaries)})
    stake: dict[str, int] = defaultdict(int)
    earned: dict[str, Fraction] = defaultdict(Fraction)
    out: dict[int, dict[str, Fraction]] = {}
    pending = sorted(changes)
    i = 0
    for a, b in zip(points, points[1:] + [points[-1]]):
        while i < len(pending) and pending[i][0] <= a:
            stake[pending[i][1]] += pending[i][2]
            i += 1
        if a % H == 0 and a // H in boundaries:
            out[a // H] = dict(earned)
        lo, hi = max(a, start), min(b, end)
        total_stake = sum(stake.values())
        if hi > lo and total_stake > 0:
            for user, units in stake.items():
                earned[user] += rate * (hi - lo) * units / total_stake
    return out


@st.composite
def scenarios(draw):  # type: ignore[no-untyped-def]
    hours = draw(st.integers(1, 6))
    total = Fraction(draw(st.integers(1, 10**12)), 10**SCALE)
    start, end = START_HOUR * H, (START_HOUR + hours) * H
    users = ["u0", "u1", "u2", "u3"]
    held: dict[str, int] = defaultdict(int)
    changes = []
    t = start
    for _ in range(draw(st.integers(0, 14))):
        # Around boundaries on purpose: just before, at, just after, or anywhere.
        kind = draw(st.sampled_from(["any", "before", "at", "after"]))
        hour = draw(st.integers(START_HOUR, START_HOUR + hours))
        if kind == "any":
            when = draw(st.integers(start, end + H))
        else:
            when = hour * H + {"before": -1, "at": 0, "after": 1}[kind]
        when = max(when, t)  # a pool's changes arrive in time order
        t = when
        user = draw(st.sampled_from(users))
        if held[user] and draw(st.booleans()):
            delta = -draw(st.integers(1, held[user]))
        else:
            delta = draw(st.integers(1, 10**20))
        held[user] += delta
        changes.append((when, user, delta))
    hourly = draw(st.booleans())
    boundaries = list(range(START_HOUR + 1, START_HOUR + hours + 1)) if hourly else [START_HOUR + hours]
    lag = draw(st.integers(0, 3))  # payout requests arrive this many hours late
    return total, start, end, changes, boundaries, lag


def run_engine(total: Fraction, start: int, end: int, changes: list[tuple[int, str, int]], boundaries: list[int], lag: int) -> dict[int, dict[str, int]]:
    pool = lp.Pool("p", "BTC", SCALE, total, start, end, last_us=start)
    pool = lp.Pool.from_dict(pool.to_dict())
    stakes: dict[str, lp.Stake] = {}
    paid: dict[int, dict[str, int]] = {}
    offset = 0
    queue = list(changes)
    for b in boundaries:
        # Stake changes before the boundary + lag hours arrive before the tick and payout.
        while queue and queue[0][0] < (b + lag) * H:
            when, user, delta = queue.pop(0)
            offset += 1
            got = lp.apply_stake_change(pool, stakes.get(user), stake_id=user, user_id=user, delta_units=delta, at_us=when, offset=offset)
            assert got is not None
            # Round trip through the table format.
            stakes[user] = lp.Stake.from_dict(got.to_dict())
            pool = lp.Pool.from_dict(pool.to_dict())
        pool.advance(b * H)  # the tick
        offset += 1
        entry, status = pool.record_payout("j", f"p{b}", b, offset)
        assert status == "new" and entry is not None
        paid[b] = {s.user_id: units for s, units in lp.pay(pool, entry, sorted(stakes.values(), key=lambda s: s.stake_id))}
        # A replay at the same offset pays the same.
        again, status = pool.record_payout("j", f"p{b}", b, offset)
        assert status == "replay" and again is entry
        assert {s.user_id: u for s, u in lp.pay(pool, entry, stakes.values())} == paid[b]
    return paid


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_every_payout_is_the_reference_to_the_unit(scenario) -> None:  # type: ignore[no-untyped-def]
    total, start, end, changes, boundaries, lag = scenario
    expected = reference(total, start, end, changes, boundaries)
    paid = run_engine(total, start, end, changes, boundaries, lag)
    previous: dict[str, int] = defaultdict(int)
    grand = 0
    for b in boundaries:
        want = {}
        for user, e in expected[b].items():
            cumulative = lp.floor_units(e, SCALE)
            if cumulative - previous[user] > 0:
                want[user] = cumulative - previous[user]
            previous[user] = cumulative
        assert paid[b] == want, (b, paid[b], want)
        grand += sum(paid[b].values())
    # Never more than the pool's total; short only by the undistributed reward (no stake)
    # and less than one unit of dust per recipient.
    exact = sum(expected[boundaries[-1]].values(), Fraction(0))
    assert grand <= lp.floor_units(total, SCALE)
    recipients = len(expected[boundaries[-1]])
    assert exact * 10**SCALE - grand < max(recipients, 1) or recipients == 0


def test_one_staker_the_whole_time_gets_everything() -> None:
    total = Fraction(24)
    pool = lp.Pool("p", "BTC", SCALE, total, START_HOUR * H, (START_HOUR + 24) * H, last_us=START_HOUR * H)
    stake = lp.apply_stake_change(pool, None, stake_id="s", user_id="u", delta_units=5, at_us=START_HOUR * H, offset=1)
    assert stake is not None
    pool.advance((START_HOUR + 24) * H)
    entry, _ = pool.record_payout("j", "end", START_HOUR + 24, 2)
    assert entry is not None
    assert [(s.stake_id, units) for s, units in lp.pay(pool, entry, [stake])] == [("s", 24 * 10**SCALE)]
    assert pool.undistributed == 0


def test_reward_while_nobody_stakes_is_not_distributed() -> None:
    pool = lp.Pool("p", "BTC", SCALE, Fraction(2), START_HOUR * H, (START_HOUR + 2) * H, last_us=START_HOUR * H)
    stake = lp.apply_stake_change(pool, None, stake_id="s", user_id="u", delta_units=1, at_us=(START_HOUR + 1) * H, offset=1)
    assert stake is not None
    pool.advance((START_HOUR + 2) * H)
    assert pool.undistributed == 1
    assert lp.claimable(pool, stake, (START_HOUR + 2) * H) == 1


def test_a_duplicate_change_is_applied_once() -> None:
    pool = lp.Pool("p", "BTC", SCALE, Fraction(2), START_HOUR * H, (START_HOUR + 2) * H, last_us=START_HOUR * H)
    stake = lp.apply_stake_change(pool, None, stake_id="s", user_id="u", delta_units=1, at_us=START_HOUR * H + 5, offset=7)
    assert lp.apply_stake_change(pool, stake, stake_id="s", user_id="u", delta_units=1, at_us=START_HOUR * H + 5, offset=7) is None
    assert pool.staked == 1


def test_the_accumulator_denominator_is_capped_downward() -> None:
    pool = lp.Pool("p", "BTC", SCALE, Fraction(10**6), START_HOUR * H, (START_HOUR + 1) * H, last_us=START_HOUR * H)
    primes = [1_000_003, 1_000_033, 1_000_037, 1_000_039, 1_000_081, 1_000_099, 1_000_117, 1_000_121, 1_000_133, 1_000_151]
    for i, p in enumerate(primes * 3):
        lp.apply_stake_change(pool, None, stake_id=f"s{i}", user_id=f"u{i}", delta_units=p, at_us=START_HOUR * H + 1 + i, offset=i + 1)
    assert pool.acc.denominator <= lp.ACC_CAP


def test_format_units() -> None:
    assert lp.format_units(1, 8) == "0.00000001"
    assert lp.format_units(150000000, 8) == "1.5"
    assert lp.format_units(7, 0) == "7"


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_a_pool_write_lost_after_the_stake_write_is_recovered_exactly(scenario) -> None:  # type: ignore[no-untyped-def]
    """The engine writes a stake change's stake, then its pool; a crash may keep the first
    write only. Replaying the change then applies the pool's part alone: the state is
    the one of a run without the crash."""
    total, start, end, changes, _, _ = scenario
    calm = lp.Pool("p", "BTC", SCALE, total, start, end, last_us=start)
    crashed = lp.Pool.from_dict(calm.to_dict())
    stakes: dict[str, lp.Stake] = {}
    for offset, (when, user, delta) in enumerate(changes, start=1):
        before = lp.Pool.from_dict(crashed.to_dict())
        stake = lp.apply_stake_change(calm, stakes.get(user), stake_id=user, user_id=user, delta_units=delta, at_us=when, offset=offset)
        assert stake is not None
        stakes[user] = stake
        crashed = before  # the pool's write was lost; the stake's was kept
        lp.apply_to_pool(crashed, delta_units=delta, at_us=when, offset=offset)
        assert crashed.to_dict() == calm.to_dict()
