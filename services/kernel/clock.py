"""The one source of 'now' for every process.

Amounts never depend on the wall clock (time enters the accrual engine as tick events),
but services stamp their changes and the scheduler decides when an hour is over. Both ask
``Clock.now()``. In production that is the wall clock. For end-to-end tests and demos,
``EARN_CLOCK_FILE`` names a file holding an ISO-8601 UTC time that every process reads
instead, so a test can move time forward by days in a second, deterministically, without
any test-only RPC.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.kernel.errors import InvalidArgument

HOUR = 3600
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._cached: tuple[int, datetime] | None = None

    def now(self) -> datetime:
        if self.path is None:
            return datetime.now(UTC)
        stamp = os.stat(self.path).st_mtime_ns
        if self._cached is None or self._cached[0] != stamp:
            self._cached = (stamp, parse(self.path.read_text().strip()))
        return self._cached[1]


def parse(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"clock time {text!r} must carry a UTC offset")
    return value.astimezone(UTC)


def timestamp_field(request: Any, field: str, *, name: str = "") -> datetime:
    """A required ``google.protobuf.Timestamp`` field as a UTC datetime; INVALID_ARGUMENT
    when it is missing or out of range. Errors name ``name`` (default: the field), for a
    field read from a nested message (``time.from``, ``ticks[3].event_time``)."""
    name = name or field
    if not request.HasField(field):
        raise InvalidArgument(name, "is required")
    try:
        return getattr(request, field).ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(name, "is not a valid timestamp (0001-01-01 to 9999-12-31, nanos 0 to 999999999)") from None


def optional_timestamp_field(request: Any, field: str, *, name: str = "") -> datetime | None:
    """An optional Timestamp field (:func:`timestamp_field`): None when it is not set."""
    return timestamp_field(request, field, name=name) if request.HasField(field) else None


def micros(moment: datetime) -> int:
    """Whole microseconds since the epoch of an aware datetime (exact: no float)."""
    delta = moment.astimezone(UTC) - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def whole_seconds_us(request: Any, field: str) -> int:
    """A required Timestamp field of whole seconds (:func:`timestamp_field`, nanos zero),
    as microseconds since the epoch."""
    moment = timestamp_field(request, field)
    if getattr(request, field).nanos:
        raise InvalidArgument(field, "must be whole seconds (nanos zero)")
    return micros(moment)


def micros_field(request: Any, field: str, *, name: str = "") -> int:
    """A required Timestamp field at microsecond precision (:func:`timestamp_field`, nanos a
    multiple of 1000), as microseconds since the epoch."""
    moment = timestamp_field(request, field, name=name)
    if getattr(request, field).nanos % 1000:
        raise InvalidArgument(name or field, "has a precision finer than a microsecond")
    return micros(moment)


def full_hour_field(request: Any, field: str) -> datetime:
    """A required Timestamp field on a UTC hour boundary (:func:`timestamp_field`; minutes,
    seconds and nanos zero)."""
    moment = timestamp_field(request, field)
    value = getattr(request, field)
    if value.seconds % HOUR or value.nanos:
        raise InvalidArgument(field, "must be a full UTC hour (minutes, seconds and nanos zero)")
    return moment


def unix_hour(moment: datetime) -> int:
    """The UTC hour a moment falls in, as hours since the epoch."""
    return int(moment.timestamp()) // HOUR


def hour_start(hour: int) -> datetime:
    return datetime.fromtimestamp(hour * HOUR, UTC)


def set_time(path: Path, moment: datetime) -> None:
    """Move a file clock (tests, demos). Written atomically so readers never see half."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(moment.astimezone(UTC).isoformat())
    os.replace(tmp, path)
