"""The kernel's reading of Timestamp fields (services.kernel.clock): ``timestamp_field``
(CandyDrop's campaign window) and ``whole_seconds_us`` (Dual's and Leverage's settlement
and maturity times)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, strategies as st

from earn.v1 import dual_pb2
from services.kernel.clock import timestamp_field, whole_seconds_us
from services.kernel.errors import InvalidArgument
from services.market.domain import micros


@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)).map(lambda d: d.replace(microsecond=0, tzinfo=UTC)))
def test_whole_seconds_are_the_market_microseconds(moment: datetime) -> None:
    request = dual_pb2.SettleDualPlansRequest()
    request.until.FromDatetime(moment)
    assert whole_seconds_us(request, "until") == micros(moment)


def test_missing_fractional_and_out_of_range() -> None:
    with pytest.raises(InvalidArgument, match="until: is required"):
        whole_seconds_us(dual_pb2.SettleDualPlansRequest(), "until")
    request = dual_pb2.SettleDualPlansRequest()
    request.until.seconds, request.until.nanos = 1_900_000_000, 5
    with pytest.raises(InvalidArgument, match="whole seconds"):
        whole_seconds_us(request, "until")
    request.until.seconds, request.until.nanos = 10**12, 0
    with pytest.raises(InvalidArgument, match="not a valid timestamp"):
        whole_seconds_us(request, "until")


def test_timestamp_field_keeps_fractions() -> None:
    request = dual_pb2.SettleDualPlansRequest()
    request.until.seconds, request.until.nanos = 1_900_000_000, 5000
    assert timestamp_field(request, "until") == datetime(2030, 3, 17, 17, 46, 40, 5, tzinfo=UTC)
