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

HOUR = 3600


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
