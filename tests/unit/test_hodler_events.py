"""HODLer's reading of the wallet's TransfersPosted events (as the outbox wraps them):
which postings change counted holdings, by how much, at which microsecond, with which
inbox key; holds count for Simple Earn only; unreadable records raise."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from google.protobuf.message import DecodeError

from earn.v1 import wallet_pb2 as wp
from services.hodler.api import HodlerApi
from services.kernel import events
from services.kernel.errors import InvalidArgument

AT = datetime(2032, 3, 3, 1, 2, 3, 456789, tzinfo=UTC)
FUNDING, HOLD, EXTERNAL, EXPENSE, TREASURY = (
    wp.ACCOUNT_KIND_FUNDING, wp.ACCOUNT_KIND_HOLD, wp.ACCOUNT_KIND_EXTERNAL, wp.ACCOUNT_KIND_EXPENSE, wp.ACCOUNT_KIND_TREASURY,
)


def posted(kind: str, legs: list[tuple[str, int, str, int, str]], holder: str = "", posting_id: str = "7", asset: str = "GT") -> bytes:
    message = wp.TransfersPosted(posting_id=posting_id, posting_kind=kind, holder=holder)
    message.created_at.FromDatetime(AT)
    for src, src_kind, dst, dst_kind, amount in legs:
        message.transfers.add(transfer=wp.Transfer(
            asset=asset, amount=amount, source=wp.AccountRef(owner=src, kind=src_kind), destination=wp.AccountRef(owner=dst, kind=dst_kind),
        ))
    return events.wrap(message, key=posting_id, producer="wallet", occurred_at=AT).SerializeToString()


def test_deposit_counts_at_the_postings_microsecond() -> None:
    parsed = HodlerApi.parse_posting(posted("deposit", [("exchange", EXTERNAL, "u", FUNDING, "2.5")]))
    assert parsed is not None
    assert parsed.changes == {("u", "GT"): Decimal("2.5")}
    assert parsed.t_us == int(datetime(2032, 3, 3, 1, 2, 3, tzinfo=UTC).timestamp()) * 1_000_000 + 456789
    again = HodlerApi.parse_posting(posted("deposit", [("exchange", EXTERNAL, "u", FUNDING, "1")]))
    assert again is not None and again.key == parsed.key  # the inbox key is the posting's
    other = HodlerApi.parse_posting(posted("deposit", [("exchange", EXTERNAL, "u", FUNDING, "1")], posting_id="8"))
    assert other is not None and other.key != parsed.key


@pytest.mark.parametrize("holder,change", [("simple_earn", None), ("loan", Decimal(-3)), ("launchpool", Decimal(-3)), ("", Decimal(-3))])
def test_a_hold_counts_for_simple_earn_only(holder: str, change: Decimal | None) -> None:
    parsed = HodlerApi.parse_posting(posted("hold_place", [("u", FUNDING, "u", HOLD, "3")], holder=holder))
    assert (parsed.changes if parsed else None) == ({("u", "GT"): change} if change is not None else None)
    released = HodlerApi.parse_posting(posted("hold_release", [("u", HOLD, "u", FUNDING, "3")], holder=holder))
    assert (released.changes if released else None) == ({("u", "GT"): -change} if change is not None else None)


def test_a_capture_of_a_simple_earn_hold_leaves_the_counted_holdings() -> None:
    parsed = HodlerApi.parse_posting(posted("hold_capture", [("u", HOLD, "simple_earn", TREASURY, "1.5")], holder="simple_earn"))
    assert parsed is not None and parsed.changes == {("u", "GT"): Decimal("-1.5")}


def test_bulk_credit_columns_and_other_accounts() -> None:
    message = wp.TransfersPosted(posting_id="9", posting_kind="bulk_credit")
    message.created_at.FromDatetime(AT)
    message.bulk_credit.asset = "GT"
    message.bulk_credit.source.CopyFrom(wp.AccountRef(owner="campaign", kind=EXPENSE))
    message.bulk_credit.owners.extend(["a", "b"])
    message.bulk_credit.amounts.extend(["1", "0.00000001"])
    raw = events.wrap(message, key="9", producer="wallet", occurred_at=AT).SerializeToString()
    parsed = HodlerApi.parse_posting(raw)
    assert parsed is not None and parsed.changes == {("a", "GT"): Decimal(1), ("b", "GT"): Decimal("0.00000001")}
    # Between two users: both move; product accounts never count; a net zero writes nothing.
    moved = HodlerApi.parse_posting(posted("batch", [("a", FUNDING, "b", FUNDING, "2"), ("x", EXPENSE, "y", TREASURY, "9")]))
    assert moved is not None and moved.changes == {("a", "GT"): Decimal(-2), ("b", "GT"): Decimal(2)}
    assert HodlerApi.parse_posting(posted("batch", [("a", FUNDING, "b", FUNDING, "2"), ("b", FUNDING, "a", FUNDING, "2")])) is None


def test_unreadable_records_raise() -> None:
    with pytest.raises(DecodeError):
        HodlerApi.parse_posting(b"\xff not an envelope")
    with pytest.raises(InvalidArgument, match="amount"):
        HodlerApi.parse_posting(posted("deposit", [("exchange", EXTERNAL, "u", FUNDING, "1e5")]))
    with pytest.raises(InvalidArgument, match="asset"):
        HodlerApi.parse_posting(posted("deposit", [("exchange", EXTERNAL, "u", FUNDING, "1")], asset="NOPE"))
    no_time = wp.TransfersPosted(posting_id="1", posting_kind="deposit")
    with pytest.raises(InvalidArgument, match="created_at"):
        HodlerApi.parse_posting(events.wrap(no_time, key="1", producer="wallet", occurred_at=AT).SerializeToString())
