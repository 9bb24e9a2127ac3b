"""The scheduler's calendar: periods, ids, boundaries, catch-up (pure, property-tested)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.kernel.errors import InvalidArgument
from services.scheduler import domain
from services.scheduler.domain import Cadence, Job, Period, TriggerRefused

DAILY = Job("daily-job", Cadence.DAILY)
HOURLY = Job("hourly-job", Cadence.HOURLY)

moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
cadences = st.sampled_from(list(Cadence))
jobs = st.sampled_from([DAILY, HOURLY])


def test_ids_and_boundaries_of_the_examples() -> None:
    day = domain.parse_period(Cadence.DAILY, "2026-11-26")
    assert day.boundary_time == datetime(2026, 11, 27, tzinfo=UTC)
    assert day.boundary_hour == int(datetime(2026, 11, 27, tzinfo=UTC).timestamp()) // 3600
    assert day.id == "2026-11-26"
    hour = domain.parse_period(Cadence.HOURLY, "2026-11-26T13")
    assert hour.boundary_time == datetime(2026, 11, 26, 14, tzinfo=UTC)
    assert hour.id == "2026-11-26T13"
    assert domain.unix_hour(datetime(1970, 1, 1, 1, 59, tzinfo=UTC)) == 1
    assert domain.unix_hour(datetime(1969, 12, 31, 23, 30, tzinfo=UTC)) == -1


def test_unix_hour_respects_offsets_and_refuses_naive_times() -> None:
    plus2 = timezone(timedelta(hours=2))
    assert domain.unix_hour(datetime(2026, 1, 1, 2, 30, tzinfo=plus2)) == domain.unix_hour(datetime(2026, 1, 1, 0, 30, tzinfo=UTC))
    with pytest.raises(InvalidArgument):
        domain.unix_hour(datetime(2026, 1, 1))
    with pytest.raises(InvalidArgument):
        domain.parse_time("2026-01-01T00:00:00")
    assert domain.parse_time("2026-01-01T05:00:00+05:00") == datetime(2026, 1, 1, tzinfo=UTC)
    assert domain.parse_time("2026-01-01T00:00:00Z") == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("cadence", "text"),
    [
        (Cadence.DAILY, "2026-11-26T00"),
        (Cadence.DAILY, "2026-13-01"),
        (Cadence.DAILY, "2026-02-30"),
        (Cadence.DAILY, " 2026-11-26"),
        (Cadence.HOURLY, "2026-11-26"),
        (Cadence.HOURLY, "2026-11-26T24"),
        (Cadence.HOURLY, "2026-11-26T1"),
        (Cadence.HOURLY, "2026-11-26 13"),
    ],
)
def test_bad_period_ids_are_refused_with_the_expected_shape(cadence: Cadence, text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        domain.parse_period(cadence, text)
    assert err.value.field == "period"


def test_a_daily_period_must_start_at_midnight() -> None:
    with pytest.raises(ValueError):
        Period(Cadence.DAILY, 13)


@given(cadences, moments)
def test_the_period_containing_a_moment_contains_it(cadence: Cadence, moment: datetime) -> None:
    period = domain.period_containing(cadence, moment)
    hour = domain.unix_hour(moment)
    assert period.start_hour <= hour < period.boundary_hour
    assert period.boundary_hour - period.start_hour == cadence.hours
    assert domain.hour_time(period.start_hour) <= moment < period.boundary_time
    if cadence is Cadence.DAILY:
        assert domain.hour_time(period.start_hour).hour == 0
        assert period.id == moment.strftime("%Y-%m-%d")
    else:
        assert period.id == moment.strftime("%Y-%m-%dT%H")


@given(cadences, moments)
def test_ids_round_trip_and_sort_like_periods(cadence: Cadence, moment: datetime) -> None:
    period = domain.period_containing(cadence, moment)
    assert domain.parse_period(cadence, period.id) == period
    following = period.next()
    assert following.start_hour == period.boundary_hour
    assert following.previous() == period
    assert period < following and period.id < following.id


@given(jobs, moments, st.integers(min_value=-24 * 30, max_value=24 * 30))
def test_first_run_catches_up_from_the_period_containing_start(job: Job, now: datetime, offset_hours: int) -> None:
    start = now + timedelta(hours=offset_hours)
    due = domain.due_periods(job, None, now, start=start)
    first = domain.period_containing(job.cadence, start)
    if first.boundary_time > now:
        assert due == []
    else:
        assert due[0] == first
    _check_sequence(job, due, now)


@given(jobs, moments, st.integers(min_value=-24 * 400, max_value=48))
def test_catch_up_is_every_missed_period_in_order_and_none_in_the_future(job: Job, now: datetime, back: int) -> None:
    last = domain.period_containing(job.cadence, now + timedelta(hours=back))
    due = domain.due_periods(job, last, now, start=datetime(1999, 1, 1, tzinfo=UTC))
    if due:
        assert due[0] == last.next()  # nothing skipped after the last success
    _check_sequence(job, due, now)
    # Exactly the due ones: the next period after the list is not due yet.
    after = due[-1].next() if due else last.next()
    assert not after.is_due(now)


def _check_sequence(job: Job, due: list[Period], now: datetime) -> None:
    for period in due:
        assert period.cadence is job.cadence
        assert period.is_due(now)
        assert period.boundary_time <= now
    for earlier, later in zip(due, due[1:]):
        assert later == earlier.next()
    assert len({p.id for p in due}) == len(due)


@given(jobs, moments, st.integers(min_value=1, max_value=60), st.integers(min_value=1, max_value=10))
def test_catch_up_in_slices_gives_the_same_sequence(job: Job, now: datetime, back_periods: int, slice_size: int) -> None:
    start = now - timedelta(hours=back_periods * job.cadence.hours)
    whole = domain.due_periods(job, None, now, start=start)
    sliced: list[Period] = []
    last = None
    while True:
        part = domain.due_periods(job, last, now, start=start, limit=slice_size)
        if not part:
            break
        assert len(part) <= slice_size
        sliced += part
        last = part[-1]
    assert sliced == whole


@given(jobs, moments)
def test_a_period_falls_due_exactly_at_its_boundary(job: Job, moment: datetime) -> None:
    period = domain.period_containing(job.cadence, moment)
    boundary = period.boundary_time
    assert not period.is_due(boundary - timedelta(microseconds=1))
    assert period.is_due(boundary)
    assert domain.due_periods(job, period.previous(), boundary - timedelta(microseconds=1), start=boundary) == []
    assert domain.due_periods(job, period.previous(), boundary, start=boundary) == [period]


@given(jobs, moments, st.integers(min_value=1, max_value=59))
def test_a_delayed_job_falls_due_its_delay_after_the_boundary(job: Job, moment: datetime, minutes: int) -> None:
    delayed = Job(job.name, job.cadence, delay=timedelta(minutes=minutes))
    period = domain.period_containing(job.cadence, moment)
    ready = period.boundary_time + delayed.delay
    assert domain.due_periods(delayed, period.previous(), ready - timedelta(microseconds=1), start=domain.hour_time(period.start_hour)) == []
    assert domain.due_periods(delayed, period.previous(), ready, start=domain.hour_time(period.start_hour)) == [period]
    with pytest.raises(TriggerRefused, match="delay"):
        domain.check_trigger(delayed, period, period.previous(), ready - timedelta(microseconds=1), start=domain.hour_time(period.start_hour))
    domain.check_trigger(delayed, period, period.previous(), ready, start=domain.hour_time(period.start_hour))


@given(moments)
def test_the_next_boundary_is_the_next_full_hour(now: datetime) -> None:
    nxt = domain.next_boundary(now)
    assert nxt > now
    assert nxt - now <= timedelta(hours=1)
    assert nxt.minute == nxt.second == nxt.microsecond == 0
    assert 0 < domain.seconds_until_next_boundary(now) <= 3600


@settings(max_examples=200)
@given(jobs, moments, st.integers(min_value=0, max_value=20), st.integers(min_value=-3, max_value=25))
def test_a_trigger_is_allowed_only_for_the_next_due_period(job: Job, now: datetime, done: int, pick: int) -> None:
    start = now - timedelta(hours=24 * job.cadence.hours)
    first = domain.first_period(job.cadence, start)
    last_done = None if done == 0 else Period(job.cadence, first.start_hour + (done - 1) * job.cadence.hours)
    target = Period(job.cadence, first.start_hour + pick * job.cadence.hours)
    due = domain.due_periods(job, last_done, now, start=start)
    allowed = bool(due) and target == due[0]
    if allowed:
        domain.check_trigger(job, target, last_done, now, start=start)
    else:
        with pytest.raises(TriggerRefused):
            domain.check_trigger(job, target, last_done, now, start=start)


def test_trigger_refusals_say_why() -> None:
    now = datetime(2026, 11, 27, 5, 30, tzinfo=UTC)
    start = datetime(2026, 11, 20, tzinfo=UTC)
    last = domain.parse_period(Cadence.DAILY, "2026-11-24")
    with pytest.raises(TriggerRefused, match="already done"):
        domain.check_trigger(DAILY, domain.parse_period(Cadence.DAILY, "2026-11-24"), last, now, start=start)
    with pytest.raises(TriggerRefused, match="not due"):
        domain.check_trigger(DAILY, domain.parse_period(Cadence.DAILY, "2026-11-27"), last, now, start=start)
    with pytest.raises(TriggerRefused, match="skip earlier due periods: run 2026-11-25 first"):
        domain.check_trigger(DAILY, domain.parse_period(Cadence.DAILY, "2026-11-26"), last, now, start=start)
    with pytest.raises(TriggerRefused, match="before the job's first period"):
        domain.check_trigger(DAILY, domain.parse_period(Cadence.DAILY, "2026-11-19"), None, now, start=start)
    domain.check_trigger(DAILY, domain.parse_period(Cadence.DAILY, "2026-11-25"), last, now, start=start)
