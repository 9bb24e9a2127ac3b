"""The scheduler's calendar: UTC hours, periods and which periods are due. Pure.

Time is counted in unix hours (epoch seconds // 3600, always UTC). A job runs once per
period of its cadence:

- hourly: period "2026-11-26T13" covers the hour [13:00, 14:00); its boundary is hour 14;
- daily: period "2026-11-26" covers the 24 hours [2026-11-26T00:00, 2026-11-27T00:00);
  its boundary is 2026-11-27T00:00 (the payout "at 00:00 UTC for the previous 24 hours").

A period is due once its boundary has passed (boundary <= now). A job's runs form one
ordered sequence: after downtime every missed period is due, in order, and none in the
future. The first period of a job without history is the one containing ``start``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum

from services.kernel.errors import InvalidArgument

HOUR_SECONDS = 3600
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAILY_ID = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
_HOURLY_ID = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2})")


class Cadence(str, Enum):
    HOURLY = "hourly"
    DAILY = "daily"

    @property
    def hours(self) -> int:
        return 1 if self is Cadence.HOURLY else 24


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    cadence: Cadence
    # A period is due this long after its boundary (a job that waits for late inputs).
    delay: timedelta = timedelta(0)


@dataclass(frozen=True, slots=True, order=True)
class Period:
    """One period of a cadence, identified by its first hour (a multiple of 24 for daily)."""

    cadence: Cadence
    start_hour: int

    def __post_init__(self) -> None:
        if self.start_hour % self.cadence.hours:
            raise ValueError(f"a {self.cadence.value} period cannot start at unix hour {self.start_hour}")

    @property
    def boundary_hour(self) -> int:
        """The unix hour at which the period ends (exclusive): every hour before it is in or before the period."""
        return self.start_hour + self.cadence.hours

    @property
    def id(self) -> str:
        start = hour_time(self.start_hour)
        return start.strftime("%Y-%m-%d") if self.cadence is Cadence.DAILY else start.strftime("%Y-%m-%dT%H")

    @property
    def boundary_time(self) -> datetime:
        return hour_time(self.boundary_hour)

    def next(self) -> Period:
        return Period(self.cadence, self.boundary_hour)

    def previous(self) -> Period:
        return Period(self.cadence, self.start_hour - self.cadence.hours)

    def is_due(self, now: datetime) -> bool:
        return self.boundary_hour <= unix_hour(now)

    def __str__(self) -> str:
        return self.id


def _aware(moment: datetime, field: str = "time") -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidArgument(field, "must carry a UTC offset (e.g. 2026-11-26T13:00:00Z)")
    return moment


def unix_hour(moment: datetime) -> int:
    """The unix hour containing ``moment`` (floor), which must be timezone-aware."""
    delta = _aware(moment) - _EPOCH
    return (delta.days * 86400 + delta.seconds) // HOUR_SECONDS


def hour_time(hour: int) -> datetime:
    return _EPOCH + timedelta(hours=hour)


def period_containing(cadence: Cadence, moment: datetime) -> Period:
    hour = unix_hour(moment)
    return Period(cadence, hour - hour % cadence.hours)


def parse_period(cadence: Cadence, period_id: str) -> Period:
    """The period named ``period_id``: "YYYY-MM-DD" (daily) or "YYYY-MM-DDTHH" (hourly)."""
    pattern, shape = (_DAILY_ID, "YYYY-MM-DD") if cadence is Cadence.DAILY else (_HOURLY_ID, "YYYY-MM-DDTHH")
    match = pattern.fullmatch(period_id)
    if not match:
        raise InvalidArgument("period", f"a {cadence.value} period is written {shape} (UTC), got {period_id!r}")
    parts = [int(p) for p in match.groups()]
    try:
        start = datetime(*parts[:3], parts[3] if len(parts) > 3 else 0, tzinfo=UTC)  # type: ignore[misc]
    except ValueError as err:
        raise InvalidArgument("period", f"{period_id!r} is not a date: {err}") from None
    return Period(cadence, unix_hour(start))


def parse_time(text: str, field: str = "time") -> datetime:
    """An ISO 8601 timestamp with an explicit offset ("Z" allowed), as UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidArgument(field, f"an ISO 8601 timestamp with offset is required, got {text!r}") from None
    return _aware(moment, field).astimezone(UTC)


def first_period(cadence: Cadence, start: datetime) -> Period:
    """The first period of a job without history: the one containing ``start``."""
    return period_containing(cadence, start)


def due_periods(
    job: Job,
    last_done: Period | None,
    now: datetime,
    *,
    start: datetime,
    limit: int | None = None,
) -> list[Period]:
    """Every period of ``job`` after ``last_done`` whose boundary (plus the job's delay)
    has passed, in order.

    Without history (``last_done`` None) the sequence begins at the period containing
    ``start``. ``limit`` caps the list (a long outage is caught up in slices).
    """
    if last_done is not None and last_done.cadence is not job.cadence:
        raise ValueError(f"{job.name} is {job.cadence.value}; last period {last_done.id} is {last_done.cadence.value}")
    period = last_done.next() if last_done is not None else first_period(job.cadence, start)
    now_hour = unix_hour(now - job.delay)
    if period.boundary_hour > now_hour:
        return []
    count = (now_hour - period.boundary_hour) // job.cadence.hours + 1
    if limit is not None:
        count = min(count, limit)
    step = job.cadence.hours
    return [Period(job.cadence, period.start_hour + i * step) for i in range(count)]


def next_boundary(now: datetime) -> datetime:
    """The next UTC hour boundary strictly after ``now``: when anything can next fall due."""
    return hour_time(unix_hour(now) + 1)


def seconds_until_next_boundary(now: datetime) -> float:
    return (next_boundary(now) - now).total_seconds()


class TriggerRefused(Exception):
    """An operator's trigger that would break the rules of the calendar."""


def check_trigger(job: Job, period: Period, last_done: Period | None, now: datetime, *, start: datetime) -> None:
    """A run may be triggered by hand only for the job's next due period.

    Refused: a succeeded period (a run is never repeated), a period not due yet (its hours
    are not over), and a period with earlier periods still due (they would be skipped).
    """
    if period.cadence is not job.cadence:
        raise TriggerRefused(f"{job.name} is {job.cadence.value}; {period.id} is not one of its periods")
    if last_done is not None and period <= last_done:
        raise TriggerRefused(f"{job.name} {period.id} is already done (succeeded up to {last_done.id}); a run is never repeated")
    if not period.is_due(now - job.delay):
        wait = f" plus the job's delay of {job.delay}" if job.delay else ""
        raise TriggerRefused(
            f"{job.name} {period.id} is not due: its boundary {period.boundary_time.isoformat()}{wait} is after now ({now.isoformat()})"
        )
    first = last_done.next() if last_done is not None else first_period(job.cadence, start)
    if period < first:
        raise TriggerRefused(f"{job.name} {period.id} is before the job's first period {first.id} (start)")
    if period != first:
        raise TriggerRefused(f"{job.name} {period.id} would skip earlier due periods: run {first.id} first (or use catch-up)")
