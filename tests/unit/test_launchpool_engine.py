"""The Launchpool engine (services.accrual.launchpool) against a brute-force reference
written here from the product rule: the reward of hour h, total / number of hours, is
split by each user's integral of stake over the hour divided by the pool's (the ratio of
the time-weighted average stakes); an hour whose pool integral is 0 distributes nothing.
All in fractions; a payout at boundary B pays floor(E(B)) - floor(E(previous boundary))
at the reward asset's scale.

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
    """E_u(B) for every boundary hour B: the exact reward of each user through B, hour by
    hour: R x (user's integral over the hour) / (pool's integral over the hour)."""
    hours = (end - start) // H
    hourly = total / hours
    users = sorted({u for _, u, _ in changes})

    def held(user: str, t: int) -> int:
        """The user's stake during [t, t + 1 µs): every change at or before t counts."""
        return sum(d for when, u, d in changes if u == user and when <= t)

    def integral(user: str, lo: int, hi: int) -> int:
        # The stake is piecewise constant between the user's change times.
        cuts = sorted({lo, hi, *(when for when, u, _ in changes if u == user and lo < when < hi)})
        return sum(held(user, a) * (b - a) for a, b in zip(cuts, cuts[1:]))

    out: dict[int, dict[str, Fraction]] = {}
    earned: dict[str, Fraction] = {}
    for h in range(start // H, max(boundaries)):
        if h in boundaries:
            out[h] = dict(earned)
        per_user = {u: integral(u, h * H, (h + 1) * H) for u in users}
        pool = sum(per_user.values())
        for u, i in per_user.items():
            if u not in earned and any(when < (h + 1) * H for when, uu, _ in changes if uu == u):
                earned[u] = Fraction(0)
            if pool > 0 and i > 0:
                earned[u] += hourly * Fraction(i, pool)
    out[max(boundaries)] = dict(earned)
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


def run_engine(
    total: Fraction, start: int, end: int, changes: list[tuple[int, str, int]], boundaries: list[int], lag: int,
    republish: dict[int, int] | None = None,
) -> dict[int, dict[str, int]]:
    """Payouts of the engine fed ``changes`` (event id ``e<index>``); ``republish`` maps a
    change's index to an earlier change published again right after it (the outbox
    relay after a crash), at the next offset."""
    pool = lp.Pool("p", "BTC", SCALE, total, start, end, last_us=start)
    pool = lp.Pool.from_dict(pool.to_dict())
    book = lp.Book()
    paid: dict[int, dict[str, int]] = {}
    offset = 0
    queue = list(enumerate(changes))
    republish = republish or {}

    def reload() -> tuple[lp.Pool, lp.Book]:
        # Round trip through the table format (the book rebuilt as after a rebalance).
        return lp.Pool.from_dict(pool.to_dict()), lp.Book(lp.Stake.from_dict(s.to_dict()) for s in book.values())

    for b in boundaries:
        # Stake changes before the boundary + lag hours arrive before the tick and payout.
        while queue and queue[0][1][0] < (b + lag) * H:
            index, (when, user, delta) = queue.pop(0)
            offset += 1
            got = lp.apply_stake_change(
                pool, book, stake_id=user, user_id=user, delta_units=delta, at_us=when, offset=offset, event_id=f"e{index}"
            )
            assert got is not None and got[-1].stake_id == user
            pool, book = reload()
            if index in republish:
                again_when, again_user, again_delta = changes[republish[index]]
                offset += 1
                before = (pool.to_dict(), sorted(str(s.to_dict()) for s in book.values()))
                assert lp.apply_stake_change(
                    pool, book, stake_id=again_user, user_id=again_user, delta_units=again_delta, at_us=again_when, offset=offset,
                    event_id=f"e{republish[index]}",
                ) is None
                assert (pool.to_dict(), sorted(str(s.to_dict()) for s in book.values())) == before
        lp.advance(pool, book, b * H)  # the tick
        pool, book = reload()
        offset += 1
        entry, status = pool.record_payout("j", f"p{b}", b, offset)
        assert status == "new" and entry is not None
        paid[b] = {s.user_id: units for s, units in lp.pay(pool, entry, sorted(book.values(), key=lambda s: s.stake_id))}
        # A replay at the same offset pays the same.
        again, status = pool.record_payout("j", f"p{b}", b, offset)
        assert status == "replay" and again is entry
        assert {s.user_id: u for s, u in lp.pay(pool, entry, book.values())} == paid[b]
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
    book = lp.Book()
    assert lp.apply_stake_change(pool, book, stake_id="s", user_id="u", delta_units=5, at_us=START_HOUR * H, offset=1, event_id="e1")
    lp.advance(pool, book, (START_HOUR + 24) * H)
    entry, _ = pool.record_payout("j", "end", START_HOUR + 24, 2)
    assert entry is not None
    assert [(s.stake_id, units) for s, units in lp.pay(pool, entry, book.values())] == [("s", 24 * 10**SCALE)]
    assert pool.undistributed == 0


def test_the_hour_is_split_by_average_stakes_not_instant_by_instant() -> None:
    """Hour 0: a holds 3 all hour; b joins with 6 at half past. Average stakes 3 and 3:
    the hour's reward of 1 is split 1/2 and 1/2 (an instant-by-instant split would give
    a 1/2 + 1/2 x 1/3 = 2/3)."""
    pool = lp.Pool("p", "BTC", SCALE, Fraction(2), START_HOUR * H, (START_HOUR + 2) * H, last_us=START_HOUR * H)
    book = lp.Book()
    lp.apply_stake_change(pool, book, stake_id="a", user_id="a", delta_units=3, at_us=START_HOUR * H, offset=1, event_id="e1")
    lp.apply_stake_change(pool, book, stake_id="b", user_id="b", delta_units=6, at_us=START_HOUR * H + H // 2, offset=2, event_id="e2")
    settled = lp.advance(pool, book, (START_HOUR + 1) * H)
    assert [s.stake_id for s in settled] == ["a", "b"]
    a, b = book.get("a"), book.get("b")
    assert a is not None and b is not None
    assert lp.reward_through(pool, a, START_HOUR + 1) == Fraction(1, 2) == lp.reward_through(pool, b, START_HOUR + 1)
    # Hour 1, both constant (3 and 6): 1/3 and 2/3, with no stake touched at its close.
    assert lp.advance(pool, book, (START_HOUR + 2) * H) == []
    assert lp.reward_through(pool, a, START_HOUR + 2) == Fraction(1, 2) + Fraction(1, 3)
    assert lp.reward_through(pool, b, START_HOUR + 2) == Fraction(1, 2) + Fraction(2, 3)


def test_reward_of_an_hour_nobody_stakes_is_not_distributed() -> None:
    pool = lp.Pool("p", "BTC", SCALE, Fraction(2), START_HOUR * H, (START_HOUR + 2) * H, last_us=START_HOUR * H)
    book = lp.Book()
    lp.apply_stake_change(pool, book, stake_id="s", user_id="u", delta_units=1, at_us=(START_HOUR + 1) * H, offset=1, event_id="e1")
    lp.advance(pool, book, (START_HOUR + 2) * H)
    assert pool.undistributed == 1
    stake = book.get("s")
    assert stake is not None and lp.reward_through(pool, stake, START_HOUR + 2) == 1


def test_a_stake_entering_late_in_the_hour_gets_its_average_share() -> None:
    """Alone for the last minute of an hour, the pool's average is the stake's own: the
    whole hour's reward (the rule: average stake / pool's average stake)."""
    pool = lp.Pool("p", "BTC", SCALE, Fraction(1), START_HOUR * H, (START_HOUR + 1) * H, last_us=START_HOUR * H)
    book = lp.Book()
    lp.apply_stake_change(pool, book, stake_id="s", user_id="u", delta_units=7, at_us=START_HOUR * H + H - 60_000_000, offset=1, event_id="e1")
    lp.advance(pool, book, (START_HOUR + 1) * H)
    stake = book.get("s")
    assert stake is not None and lp.reward_through(pool, stake, START_HOUR + 1) == 1 and pool.undistributed == 0


def test_a_duplicate_change_is_applied_once() -> None:
    pool = lp.Pool("p", "BTC", SCALE, Fraction(2), START_HOUR * H, (START_HOUR + 2) * H, last_us=START_HOUR * H)
    book = lp.Book()
    assert lp.apply_stake_change(pool, book, stake_id="s", user_id="u", delta_units=1, at_us=START_HOUR * H + 5, offset=7, event_id="e7")
    assert lp.apply_stake_change(pool, book, stake_id="s", user_id="u", delta_units=1, at_us=START_HOUR * H + 5, offset=7, event_id="e7") is None
    assert pool.staked == 1


def test_a_change_published_again_at_a_later_offset_is_applied_once() -> None:
    """The outbox relay publishes again the events a crash kept it from marking done: the
    same event ids at later offsets, after other changes of the pool and of the stake."""
    pool = lp.Pool("p", "BTC", SCALE, Fraction(2), START_HOUR * H, (START_HOUR + 2) * H, last_us=START_HOUR * H)
    book = lp.Book()
    t = START_HOUR * H
    assert lp.apply_stake_change(pool, book, stake_id="s", user_id="u", delta_units=3, at_us=t + 5, offset=1, event_id="a")
    assert lp.apply_stake_change(pool, book, stake_id="r", user_id="v", delta_units=2, at_us=t + 6, offset=2, event_id="b")
    assert lp.apply_stake_change(pool, book, stake_id="s", user_id="u", delta_units=1, at_us=H + t + 7, offset=3, event_id="c")
    before = (pool.to_dict(), [s.to_dict() for s in book.values()])
    for offset, (stake, delta, at_us, event_id) in enumerate([("s", 3, t + 5, "a"), ("r", 2, t + 6, "b"), ("s", 1, H + t + 7, "c")], start=4):
        assert lp.apply_stake_change(pool, book, stake_id=stake, user_id="x", delta_units=delta, at_us=at_us, offset=offset, event_id=event_id) is None
    assert (pool.to_dict(), [s.to_dict() for s in book.values()]) == before
    assert pool.staked == 6 and book.get("s").units == 4  # type: ignore[union-attr]


@settings(max_examples=200, deadline=None)
@given(scenarios(), st.data())
def test_changes_published_again_pay_what_they_paid_once(scenario, data) -> None:  # type: ignore[no-untyped-def]
    total, start, end, changes, boundaries, lag = scenario
    republish = {}
    for i in range(len(changes)):
        if data.draw(st.booleans()):
            republish[i] = data.draw(st.integers(max(0, i - 5), i))
    assert run_engine(total, start, end, changes, boundaries, lag, republish) == run_engine(total, start, end, changes, boundaries, lag)


def test_a_change_below_zero_is_refused_and_changes_nothing() -> None:
    pool = lp.Pool("p", "BTC", SCALE, Fraction(2), START_HOUR * H, (START_HOUR + 2) * H, last_us=START_HOUR * H)
    book = lp.Book()
    lp.apply_stake_change(pool, book, stake_id="s", user_id="u", delta_units=3, at_us=START_HOUR * H + 5, offset=1, event_id="e1")
    before = (pool.to_dict(), [s.to_dict() for s in book.values()])
    try:
        lp.apply_stake_change(pool, book, stake_id="s", user_id="u", delta_units=-4, at_us=(START_HOUR + 1) * H + 5, offset=2, event_id="e2")
    except ValueError:
        pass
    else:
        raise AssertionError("accepted")
    assert (pool.to_dict(), [s.to_dict() for s in book.values()]) == before


def test_the_accumulator_denominator_is_capped_downward() -> None:
    hours = 10
    pool = lp.Pool("p", "BTC", SCALE, Fraction(10**6), START_HOUR * H, (START_HOUR + hours) * H, last_us=START_HOUR * H)
    book = lp.Book()
    primes = [1_000_003, 1_000_033, 1_000_037, 1_000_039, 1_000_081, 1_000_099, 1_000_117, 1_000_121, 1_000_133, 1_000_151]
    for i, p in enumerate(primes):
        # One new stake in each hour: every hour's pool integral is a new number.
        lp.apply_stake_change(pool, book, stake_id=f"s{i}", user_id=f"u{i}", delta_units=p, at_us=(START_HOUR + i) * H + 1 + i, offset=i + 1, event_id=f"e{i + 1}")
    lp.advance(pool, book, (START_HOUR + hours) * H)
    assert pool.acc.denominator <= lp.ACC_CAP
    assert all(s.d is not None and s.d.denominator <= lp.ACC_CAP for s in book.values())
    exact = sum((lp.reward_through(pool, s, START_HOUR + hours) for s in book.values()), Fraction(0))
    assert exact <= pool.total


def test_format_units() -> None:
    assert lp.format_units(1, 8) == "0.00000001"
    assert lp.format_units(150000000, 8) == "1.5"
    assert lp.format_units(7, 0) == "7"


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.data())
def test_a_crash_between_the_writes_of_a_change_is_recovered_exactly(scenario, data) -> None:  # type: ignore[no-untyped-def]
    """The engine writes a stake change's settled stakes, then the changed stake, then the
    pool; a crash may keep any prefix of these writes. Replaying the change on what was
    kept (the book rebuilt from the kept stakes) gives the state of a run without the
    crash."""
    total, start, end, changes, _, _ = scenario
    calm = lp.Pool("p", "BTC", SCALE, total, start, end, last_us=start)
    calm_book = lp.Book()
    table: dict[str, dict] = {"pool": calm.to_dict()}  # what the changelog holds
    for offset, (when, user, delta) in enumerate(changes, start=1):
        writes = lp.apply_stake_change(calm, calm_book, stake_id=user, user_id=user, delta_units=delta, at_us=when, offset=offset, event_id=f"e{offset}")
        assert writes is not None
        kept = data.draw(st.integers(0, len(writes)))  # the writes that reached the changelog
        crashed_table = dict(table)
        for stake in writes[:kept]:
            crashed_table[stake.stake_id] = stake.to_dict()
        pool = lp.Pool.from_dict(crashed_table["pool"])
        book = lp.Book(lp.Stake.from_dict(v) for k, v in crashed_table.items() if k != "pool")
        replayed = lp.apply_stake_change(pool, book, stake_id=user, user_id=user, delta_units=delta, at_us=when, offset=offset, event_id=f"e{offset}")
        assert replayed is not None
        for stake in replayed:
            crashed_table[stake.stake_id] = stake.to_dict()
        crashed_table["pool"] = pool.to_dict()
        for stake in writes:
            table[stake.stake_id] = stake.to_dict()
        table["pool"] = calm.to_dict()
        assert crashed_table == table
