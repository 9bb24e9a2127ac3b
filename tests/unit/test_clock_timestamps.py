"""The kernel's reading of Timestamp fields (services.kernel.clock): ``timestamp_field``
and ``optional_timestamp_field`` (Simple Earn's and the wallet's time filters),
``full_hour_field`` (CandyDrop's and Launchpool's windows), ``whole_seconds_us`` (Dual's and
Leverage's settlement and maturity times) and ``micros_field`` (the market's tick times)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, strategies as st

from earn.v1 import dual_pb2
from services.kernel.clock import full_hour_field, micros_field, optional_timestamp_field, timestamp_field, whole_seconds_us
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


def test_errors_name_the_given_name() -> None:
    request = dual_pb2.SettleDualPlansRequest()
    with pytest.raises(InvalidArgument, match=r"time\.from: is required"):
        timestamp_field(request, "until", name="time.from")
    request.until.seconds = 10**12
    with pytest.raises(InvalidArgument, match=r"ticks\[3\]\.event_time: is not a valid timestamp"):
        micros_field(request, "until", name="ticks[3].event_time")


def test_optional_field_is_none_when_unset() -> None:
    request = dual_pb2.SettleDualPlansRequest()
    assert optional_timestamp_field(request, "until") is None
    request.until.seconds = 3600
    assert optional_timestamp_field(request, "until") == datetime(1970, 1, 1, 1, tzinfo=UTC)


@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)).map(lambda d: d.replace(tzinfo=UTC)))
def test_micros_field_is_the_market_microseconds(moment: datetime) -> None:
    request = dual_pb2.SettleDualPlansRequest()
    request.until.FromDatetime(moment)
    assert micros_field(request, "until") == micros(moment)


def test_micros_field_refuses_sub_microsecond_nanos() -> None:
    request = dual_pb2.SettleDualPlansRequest()
    request.until.seconds, request.until.nanos = 1_900_000_000, 5001
    with pytest.raises(InvalidArgument, match="until: has a precision finer than a microsecond"):
        micros_field(request, "until")


def test_full_hour_field() -> None:
    request = dual_pb2.SettleDualPlansRequest()
    request.until.seconds = 1_900_000_800  # a whole hour: 527,778 x 3600 = 1,900,000,800
    assert full_hour_field(request, "until") == datetime(2030, 3, 17, 18, tzinfo=UTC)
    for seconds, nanos in ((1_900_000_860, 0), (1_900_000_801, 0), (1_900_000_800, 1)):
        request.until.seconds, request.until.nanos = seconds, nanos
        with pytest.raises(InvalidArgument, match="until: must be a full UTC hour"):
            full_hour_field(request, "until")


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.sampled_from([UTC, timezone(timedelta(hours=9)), timezone(-timedelta(hours=5, minutes=30))])))
def test_micros_is_exact_for_any_aware_moment(moment: datetime) -> None:
    """``clock.micros`` (Launchpool's stakes, HODLer's clock, the market's ticks): whole
    microseconds since the epoch, exact (no float), whatever the datetime's zone."""
    assert micros(moment) == (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert micros(moment + timedelta(hours=1)) - micros(moment) == 3_600_000_000
