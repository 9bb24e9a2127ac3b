"""The kernel's chunked distribution (services.kernel.distribution): the wallet keys stay
the ones CandyDrop and HODLer derived before the kernel held them (a running system
re-pays nothing after an upgrade), chunk numbers, the BulkCredit of a chunk, the ledger's
identifier check, and one payment against a fake pool and wallet: every unpaid chunk
once, in order, its posting recorded, then the parent marked."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, strategies as st

from earn.v1 import wallet_pb2
from services.kernel.distribution import Distributor, Ledger, check_run, chunk_numbers, credit_request
from services.kernel.idempotency import derived_key
from services.kernel.errors import FailedPrecondition, InvalidArgument

AT = datetime(2031, 7, 7, 3, 5, tzinfo=UTC)
LEDGER = Ledger("campaigns", "campaign_id", "prizes", "prize_asset")


def old_key(namespace: str, prefix: str, *parts: object) -> str:
    """The services' own derived_key before the kernel held it (cd: CandyDrop, hd: HODLer,
    se: Simple Earn, lp: Launchpool)."""
    text = ":".join(str(p) for p in parts)
    key = f"{namespace}:{prefix}:{text}"
    return key if len(key) <= 128 else f"{namespace}:{prefix}:h:{hashlib.sha256(text.encode()).hexdigest()}"


def test_keys_of_the_services_are_unchanged() -> None:
    assert derived_key("cd", "prize", "cmpA-1", 0) == "cd:prize:cmpA-1:0"
    assert derived_key("hd", "reward", "main-7", 12) == "hd:reward:main-7:12"
    long_id = "x" * 130
    assert derived_key("hd", "reward", long_id, 3) == "hd:reward:h:" + hashlib.sha256(f"{long_id}:3".encode()).hexdigest()


@given(
    st.sampled_from([("cd", "prize"), ("hd", "reward"), ("se", "pay"), ("se", "red"), ("lp", "reward")]),
    st.text(min_size=1, max_size=200),
    st.integers(min_value=0, max_value=10**6),
)
def test_derived_key_is_the_old_key_and_fits(names: tuple[str, str], parent: str, chunk: int) -> None:
    key = derived_key(*names, parent, chunk)
    assert key == old_key(*names, parent, chunk)
    assert len(key) <= 128


@given(st.integers(min_value=0, max_value=500), st.integers(min_value=1, max_value=50))
def test_chunk_numbers_fill_chunks_in_order(count: int, size: int) -> None:
    chunks = chunk_numbers(count, size)
    assert len(chunks) == count
    assert chunks == sorted(chunks)
    assert set(chunks) == set(range(-(-count // size)))  # 0, 1, ... with no gap
    sizes = [chunks.count(c) for c in sorted(set(chunks))]
    assert all(s == size for s in sizes[:-1]) and all(1 <= s <= size for s in sizes)


def test_credit_request_of_a_chunk() -> None:
    credit = credit_request("cd:prize:c:1", "USDT", "candydrop:c", "candydrop:prize:c", [("alice", Decimal("1.50")), ("bob", Decimal("2"))])
    assert credit.idempotency_key == "cd:prize:c:1" and credit.asset == "USDT" and credit.reference == "candydrop:prize:c"
    assert credit.source == wallet_pb2.AccountRef(owner="candydrop:c", kind=wallet_pb2.ACCOUNT_KIND_EXPENSE)
    assert list(credit.owners) == ["alice", "bob"] and list(credit.amounts) == ["1.5", "2"]


@pytest.mark.parametrize("names", [
    ("campaigns; DROP TABLE x", "campaign_id", "prizes", "prize_asset"), ("campaigns", "Campaign_Id", "prizes", "prize_asset"),
    ("", "k", "r", "a"), ("airdrops", "airdrop_id", "rewards", "reward asset"),
])
def test_ledger_takes_plain_identifiers_only(names: tuple[str, str, str, str]) -> None:
    with pytest.raises(ValueError):
        Ledger(*names)


def test_ledger_noun() -> None:
    assert LEDGER.noun == "campaign" and Ledger("airdrops", "airdrop_id", "rewards", "reward_asset").noun == "airdrop"


def test_check_run() -> None:
    now = datetime(2031, 7, 7, 3, 5, tzinfo=UTC)
    hour = int(now.timestamp()) // 3600
    assert check_run("candydrop.distribution", "2031-07-07T02", hour, now) == ("candydrop.distribution", "2031-07-07T02")
    with pytest.raises(InvalidArgument, match="boundary_hour"):
        check_run("candydrop.distribution", "2031-07-07T02", 0, now)
    with pytest.raises(FailedPrecondition, match=f"boundary_hour: {hour + 1} is after the current hour"):
        check_run("candydrop.distribution", "2031-07-07T02", hour + 1, now)
    with pytest.raises(InvalidArgument):
        check_run("", "2031-07-07T02", hour, now)


class FakePool:
    """The records of one parent as the kernel's SQL sees them."""

    def __init__(self, records: list[tuple[str, Decimal, int]]) -> None:
        self.records = [dict(user_id=u, amount=a, chunk=c, posting_id=None, paid_at=None) for u, a, c in records]
        self.distribution = "distributing"
        self.sql: list[str] = []

    async def fetch(self, sql: str, parent: str) -> list[dict[str, Any]]:
        self.sql.append(sql)
        assert "FROM prizes WHERE campaign_id = $1" in sql and parent == "c1"
        rows = [r for r in self.records if r["amount"] > 0 and r["posting_id"] is None]
        return sorted(rows, key=lambda r: (r["chunk"], r["user_id"]))

    async def execute(self, sql: str, parent: str, chunk: int, posting_id: str, at: datetime) -> None:
        self.sql.append(sql)
        assert sql.startswith("UPDATE prizes SET posting_id = $3")
        for r in self.records:
            if r["chunk"] == chunk and r["amount"] > 0 and r["posting_id"] is None:
                r["posting_id"], r["paid_at"] = posting_id, at

    async def fetchval(self, sql: str, parent: str, at: datetime) -> bool | None:
        self.sql.append(sql)
        assert sql.startswith("UPDATE campaigns SET distribution = 'distributed'")
        if self.distribution != "distributing":
            return None
        self.distribution = "distributed"
        return True


class FakeWallet:
    def __init__(self) -> None:
        self.keys: dict[str, wallet_pb2.BulkCreditRequest] = {}

    async def call(self, method: str, request: wallet_pb2.BulkCreditRequest) -> wallet_pb2.BulkCreditResponse:
        assert method == "BulkCredit"
        self.keys.setdefault(request.idempotency_key, request)
        return wallet_pb2.BulkCreditResponse(posting_id=f"p-{request.idempotency_key}")


def test_pay_sends_each_unpaid_chunk_once_then_marks() -> None:
    pool = FakePool([
        ("bob", Decimal("2"), 0), ("alice", Decimal("1"), 0), ("carol", Decimal("0"), 1), ("dave", Decimal("3"), 1), ("erin", Decimal("4"), 2),
    ])
    pool.records[-1]["posting_id"] = "already"  # chunk 2 paid and recorded before a crash
    wallet = FakeWallet()
    payer = Distributor(pool, wallet, LEDGER, lambda: AT, namespace="cd", key_prefix="prize")  # type: ignore[arg-type]

    assert asyncio.run(payer.pay("c1", asset="USDT", source_owner="candydrop:c1", reference="candydrop:prize:c1")) is True
    assert list(wallet.keys) == ["cd:prize:c1:0", "cd:prize:c1:1"]
    assert list(wallet.keys["cd:prize:c1:0"].owners) == ["alice", "bob"] and list(wallet.keys["cd:prize:c1:1"].owners) == ["dave"]
    assert {r["user_id"]: r["posting_id"] for r in pool.records} == {
        "alice": "p-cd:prize:c1:0", "bob": "p-cd:prize:c1:0", "carol": None, "dave": "p-cd:prize:c1:1", "erin": "already",
    }
    assert all(r["paid_at"] == AT for r in pool.records if r["posting_id"] not in (None, "already"))
    assert payer.chunks_paid == 2
    # Called again: nothing left to pay, the parent already marked (not counted twice).
    assert asyncio.run(payer.pay("c1", asset="USDT", source_owner="candydrop:c1", reference="candydrop:prize:c1")) is False
    assert payer.chunks_paid == 2
