"""Wallet service through gRPC against the real PostgreSQL and Kafka."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal

import asyncpg
import grpc
from services.kernel import grpcclient
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from earn.v1 import wallet_pb2, wallet_pb2_grpc
from tests.conftest import GATEWAY, OPERATOR, SERVICE, eventually, unique

FUNDING = wallet_pb2.ACCOUNT_KIND_FUNDING
HOLD = wallet_pb2.ACCOUNT_KIND_HOLD
TREASURY = wallet_pb2.ACCOUNT_KIND_TREASURY
EXPENSE = wallet_pb2.ACCOUNT_KIND_EXPENSE


@pytest.fixture(scope="module")
def wallet(wallet_channel: grpc.aio.Channel) -> wallet_pb2_grpc.WalletServiceStub:
    return wallet_pb2_grpc.WalletServiceStub(wallet_channel)


async def deposit(wallet: wallet_pb2_grpc.WalletServiceStub, owner: str, amount: str, asset: str = "BTC") -> None:
    await wallet.Deposit(wallet_pb2.DepositRequest(idempotency_key=unique("dep"), owner=owner, asset=asset, amount=amount), metadata=OPERATOR)


async def balance(wallet: wallet_pb2_grpc.WalletServiceStub, owner: str, asset: str = "BTC", kind: int = FUNDING) -> Decimal:
    reply = await wallet.GetBalances(wallet_pb2.GetBalancesRequest(owner=owner, asset=asset), metadata=GATEWAY)
    return sum((Decimal(b.balance) for b in reply.balances if b.kind == kind), Decimal(0))


def spec(src: str, dst: str, amount: str, asset: str = "BTC", src_kind: int = FUNDING, dst_kind: int = FUNDING) -> wallet_pb2.TransferSpec:
    return wallet_pb2.TransferSpec(
        asset=asset,
        source=wallet_pb2.AccountRef(owner=src, kind=src_kind),
        destination=wallet_pb2.AccountRef(owner=dst, kind=dst_kind),
        amount=amount,
    )


async def snapshot(db: asyncpg.Pool) -> tuple:
    """Everything a write could change."""
    return tuple(
        await db.fetchrow(
            "SELECT (SELECT count(*) FROM accounts), (SELECT coalesce(sum(abs(balance)), 0) FROM accounts),"
            " (SELECT count(*) FROM postings), (SELECT count(*) FROM transfers), (SELECT count(*) FROM holds),"
            " (SELECT coalesce(sum(remaining), 0) FROM holds), (SELECT count(*) FROM idempotency_keys),"
            " (SELECT max(id) FROM postings)"
        )
    )


async def test_reflection_and_health_need_only_the_address(wallet_process) -> None:
    async with grpcclient.channel(wallet_process.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    sync_channel = grpcclient.sync_channel(wallet_process.address)
    try:
        database = ProtoReflectionDescriptorDatabase(sync_channel)
        services = await asyncio.to_thread(database.get_services)
        assert "earn.v1.WalletService" in services
        descriptor = await asyncio.to_thread(database.FindFileContainingSymbol, "earn.v1.WalletService")
        methods = {m.name for s in descriptor.service for m in s.method}
        assert {"Transfer", "TransferBatch", "PlaceHold", "GetBalances", "ListTransfers"} <= methods
    finally:
        sync_channel.close()


async def test_concurrent_retries_of_one_key_apply_once(wallet) -> None:
    alice, bob = unique("alice"), unique("bob")
    await deposit(wallet, alice, "10")
    request = wallet_pb2.TransferRequest(idempotency_key=unique(), transfer=spec(alice, bob, "1.5"))
    replies = await asyncio.gather(*(wallet.Transfer(request, metadata=SERVICE) for _ in range(20)))
    assert len({r.transfer.transfer_id for r in replies}) == 1
    assert all(r == replies[0] for r in replies)
    assert await balance(wallet, alice) == Decimal("8.5")
    assert await balance(wallet, bob) == Decimal("1.5")


async def test_same_key_different_request_is_refused_and_changes_nothing(wallet, wallet_db) -> None:
    alice, bob = unique("alice"), unique("bob")
    await deposit(wallet, alice, "10")
    key = unique()
    await wallet.Transfer(wallet_pb2.TransferRequest(idempotency_key=key, transfer=spec(alice, bob, "1")), metadata=SERVICE)
    before = await snapshot(wallet_db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet.Transfer(wallet_pb2.TransferRequest(idempotency_key=key, transfer=spec(alice, bob, "2")), metadata=SERVICE)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency_key" in err.value.details()
    assert await snapshot(wallet_db) == before
    assert await balance(wallet, bob) == Decimal(1)


async def test_batch_applies_fully_or_not_at_all(wallet, wallet_db) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    await deposit(wallet, alice, "3")
    before = await snapshot(wallet_db)
    bad = wallet_pb2.TransferBatchRequest(
        idempotency_key=unique(), transfers=[spec(alice, bob, "2"), spec(bob, carol, "1"), spec(alice, carol, "1.00000001")]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet.TransferBatch(bad, metadata=SERVICE)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == f"insufficient funds in {alice}/BTC/funding: short by 0.00000001 BTC"
    assert await snapshot(wallet_db) == before

    good = wallet_pb2.TransferBatchRequest(idempotency_key=unique(), transfers=[spec(alice, bob, "2"), spec(bob, carol, "1")])
    reply = await wallet.TransferBatch(good, metadata=SERVICE)
    assert reply.transfer_count == 2
    assert [await balance(wallet, u) for u in (alice, bob, carol)] == [Decimal(1), Decimal(1), Decimal(1)]
    listed = await wallet.ListTransfers(wallet_pb2.ListTransfersRequest(posting_id=reply.posting_id), metadata=GATEWAY)
    assert [(t.source.owner, t.destination.owner, t.amount) for t in listed.transfers] == [(alice, bob, "2"), (bob, carol, "1")]


async def test_no_negative_balance_under_50_concurrent_conflicting_transfers(wallet) -> None:
    alice = unique("alice")
    await deposit(wallet, alice, "10")
    requests = [
        wallet_pb2.TransferRequest(idempotency_key=unique(), transfer=spec(alice, unique("r"), "1")) for _ in range(50)
    ]
    results = await asyncio.gather(*(wallet.Transfer(r, metadata=SERVICE) for r in requests), return_exceptions=True)
    ok = [r for r in results if isinstance(r, wallet_pb2.TransferResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 10 and len(refused) == 40
    assert {e.code() for e in refused} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert await balance(wallet, alice) == 0


async def test_holds_place_release_capture(wallet) -> None:
    alice = unique("alice")
    await deposit(wallet, alice, "5", "USDT")
    placed = await wallet.PlaceHold(
        wallet_pb2.PlaceHoldRequest(idempotency_key=unique(), owner=alice, asset="USDT", amount="4", holder="simple_earn"), metadata=SERVICE
    )
    hold_id = placed.hold.hold_id
    assert (await balance(wallet, alice, "USDT"), await balance(wallet, alice, "USDT", HOLD)) == (Decimal(1), Decimal(4))
    released = await wallet.ReleaseHold(wallet_pb2.ReleaseHoldRequest(idempotency_key=unique(), hold_id=hold_id, amount="1.5"), metadata=SERVICE)
    assert released.hold.remaining == "2.5"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet.ReleaseHold(wallet_pb2.ReleaseHoldRequest(idempotency_key=unique(), hold_id=hold_id, amount="3"), metadata=SERVICE)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    captured = await wallet.CaptureHold(
        wallet_pb2.CaptureHoldRequest(
            idempotency_key=unique(), hold_id=hold_id, destination=wallet_pb2.AccountRef(owner="dual", kind=TREASURY)
        ),
        metadata=SERVICE,
    )
    assert captured.hold.status == wallet_pb2.HOLD_STATUS_CLOSED
    assert (await balance(wallet, alice, "USDT"), await balance(wallet, alice, "USDT", HOLD)) == (Decimal("2.5"), Decimal(0))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet.GetHold(wallet_pb2.GetHoldRequest(hold_id="999999999"), metadata=GATEWAY)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_concurrent_holds_post_together_each_its_own_posting_and_never_overdraw(wallet, wallet_db) -> None:
    """PlaceHolds that arrive together share a transaction (group commit): each is still
    its own posting, transfer, hold and event, and one that would overdraw is refused alone."""
    alice, bob = unique("alice"), unique("bob")
    await deposit(wallet, alice, "10")
    await deposit(wallet, bob, "3")

    def hold(owner: str, amount: str, key: str | None = None) -> wallet_pb2.PlaceHoldRequest:
        return wallet_pb2.PlaceHoldRequest(idempotency_key=key or unique(), owner=owner, asset="BTC", amount=amount, holder="simple_earn")

    before = await snapshot(wallet_db)
    retried = hold(bob, "1")
    requests = [hold(alice, "1") for _ in range(14)] + [hold(bob, "1"), retried, retried, hold(bob, "2", retried.idempotency_key)]
    requests.append(hold(bob, "0.5"))
    results = await asyncio.gather(*(wallet.PlaceHold(r, metadata=SERVICE) for r in requests), return_exceptions=True)
    alices = results[:14]
    assert sum(isinstance(r, wallet_pb2.PlaceHoldResponse) for r in alices) == 10
    assert {(e.code(), f"insufficient funds in {alice}/BTC/funding: short by 1 BTC" in e.details()) for e in alices
            if isinstance(e, grpc.aio.AioRpcError)} == {(grpc.StatusCode.FAILED_PRECONDITION, True)}
    first, again, reused = results[15:18]
    assert again == first and isinstance(first, wallet_pb2.PlaceHoldResponse)  # one key, one hold
    assert isinstance(reused, grpc.aio.AioRpcError) and reused.code() == grpc.StatusCode.ALREADY_EXISTS
    assert all(isinstance(r, wallet_pb2.PlaceHoldResponse) for r in (results[14], results[18]))
    assert (await balance(wallet, alice), await balance(wallet, alice, kind=HOLD)) == (0, 10)
    assert (await balance(wallet, bob), await balance(wallet, bob, kind=HOLD)) == (Decimal("0.5"), Decimal("2.5"))
    placed = [r.hold for r in results if isinstance(r, wallet_pb2.PlaceHoldResponse)]
    assert len({h.hold_id for h in placed}) == 13 and all(h.remaining == h.amount for h in placed)
    after = await snapshot(wallet_db)
    # 13 holds, each its own posting with one transfer, and 13 keys: nothing of the refused ones.
    assert (after[2] - before[2], after[3] - before[3], after[4] - before[4], after[6] - before[6]) == (13, 13, 13, 13)
    kinds = await wallet_db.fetch("SELECT kind, count(*) FROM postings WHERE id > $1 GROUP BY kind", before[7])
    assert [tuple(r) for r in kinds] == [("hold_place", 13)]


async def test_concurrent_releases_and_captures_settle_together_as_if_one_after_another(wallet, wallet_db) -> None:
    alice = unique("alice")
    await deposit(wallet, alice, "10")
    holds = [
        (await wallet.PlaceHold(wallet_pb2.PlaceHoldRequest(idempotency_key=unique(), owner=alice, asset="BTC", amount=a, holder="simple_earn"),
                                metadata=SERVICE)).hold.hold_id
        for a in ("4", "3", "3")
    ]
    before = await snapshot(wallet_db)
    key = unique()
    treasury = wallet_pb2.AccountRef(owner="dual", kind=TREASURY)
    calls = [wallet.ReleaseHold(wallet_pb2.ReleaseHoldRequest(idempotency_key=unique(), hold_id=holds[0], amount="1"), metadata=SERVICE) for _ in range(5)]
    calls += [wallet.ReleaseHold(wallet_pb2.ReleaseHoldRequest(idempotency_key=key, hold_id=holds[1], amount="2"), metadata=SERVICE) for _ in range(2)]
    calls += [wallet.CaptureHold(wallet_pb2.CaptureHoldRequest(idempotency_key=unique(), hold_id=holds[2], destination=treasury), metadata=SERVICE)]
    calls += [wallet.ReleaseHold(wallet_pb2.ReleaseHoldRequest(idempotency_key=unique(), hold_id="999999999"), metadata=SERVICE)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    released = results[:5]  # four fit in the 4 held: one is refused and writes nothing
    ok = [r for r in released if isinstance(r, wallet_pb2.ReleaseHoldResponse)]
    assert sorted(r.hold.remaining for r in ok) == ["0", "1", "2", "3"]
    assert [r.code() for r in released if isinstance(r, grpc.aio.AioRpcError)] == [grpc.StatusCode.FAILED_PRECONDITION]
    assert results[5] == results[6] and results[5].hold.remaining == "1"
    assert results[7].hold.status == wallet_pb2.HOLD_STATUS_CLOSED
    assert isinstance(results[8], grpc.aio.AioRpcError) and results[8].code() == grpc.StatusCode.NOT_FOUND
    assert (await balance(wallet, alice), await balance(wallet, alice, kind=HOLD)) == (Decimal(6), Decimal(1))
    after = await snapshot(wallet_db)
    assert (after[2] - before[2], after[6] - before[6]) == (6, 6)  # 4 + 1 releases and 1 capture: a posting and a key each


async def test_list_transfers_pages_oldest_first(wallet) -> None:
    alice, bob = unique("alice"), unique("bob")
    await deposit(wallet, alice, "1")
    for _ in range(5):
        await wallet.Transfer(wallet_pb2.TransferRequest(idempotency_key=unique(), transfer=spec(alice, bob, "0.1")), metadata=SERVICE)
    seen, token = [], ""
    while True:
        page = await wallet.ListTransfers(wallet_pb2.ListTransfersRequest(owner=bob, page_size=2, page_token=token), metadata=GATEWAY)
        seen += [int(t.transfer_id) for t in page.transfers]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 5 and seen == sorted(seen)


BAD_REQUESTS = [
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="k-bad-1", transfer=spec("alice", "bob", "-1")), "transfer.amount"),
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="k-bad-2", transfer=spec("alice", "bob", "0")), "transfer.amount"),
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="k-bad-3", transfer=spec("alice", "bob", "0.000000001")), "transfer.amount"),
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="k-bad-4", transfer=spec("alice", "bob", "1e3")), "transfer.amount"),
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="k-bad-5", transfer=spec("alice", "bob", "NaN")), "transfer.amount"),
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="k-bad-6", transfer=spec("alice", "bob", "Infinity")), "transfer.amount"),
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="k-bad-7", transfer=spec("alice", "bob", "1", asset="NOPE")), "transfer.asset"),
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="", transfer=spec("alice", "bob", "1")), "idempotency_key"),
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="k-bad-8", transfer=spec("alice", "bob", "9" * 40)), "transfer.amount"),
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="k-bad-9", transfer=spec("alice", "bob", "123456789012345678901")), "transfer.amount"),
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="k-bad-10", transfer=spec("alice", "bob", "")), "transfer.amount"),
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="k-bad-11", transfer=spec("alice", "alice", "1")), "transfer.destination"),
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="k-bad-12", transfer=spec("alice", "bob", "1", dst_kind=HOLD)), "transfer.destination.kind"),
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="k-bad-13", transfer=spec("x" * 65, "bob", "1")), "transfer.source.owner"),
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="k bad", transfer=spec("alice", "bob", "1")), "idempotency_key"),
    ("Transfer", wallet_pb2.TransferRequest(idempotency_key="k-bad-14"), "transfer"),
    ("TransferBatch", wallet_pb2.TransferBatchRequest(idempotency_key="k-bad-15"), "transfers"),
    ("TransferBatch", wallet_pb2.TransferBatchRequest(idempotency_key="k-bad-16", transfers=[spec("alice", "bob", "1"), spec("alice", "bob", "-2")]), "transfers[1].amount"),
    ("Deposit", wallet_pb2.DepositRequest(idempotency_key="k-bad-17", owner="alice", asset="BTC", amount="1.0.0"), "amount"),
    ("Deposit", wallet_pb2.DepositRequest(idempotency_key="k-bad-18", owner="", asset="BTC", amount="1"), "owner"),
    ("Deposit", wallet_pb2.DepositRequest(idempotency_key="k-bad-19", owner="alice", asset="", amount="1"), "asset"),
    ("Withdraw", wallet_pb2.WithdrawRequest(idempotency_key="k-bad-20", owner="alice", asset="USDT", amount="0.0000001"), "amount"),
    ("PlaceHold", wallet_pb2.PlaceHoldRequest(idempotency_key="k-bad-21", owner="alice", asset="BTC", amount="1", holder=""), "holder"),
    ("PlaceHold", wallet_pb2.PlaceHoldRequest(idempotency_key="k-bad-22", owner="alice", asset="BTC", amount=" 1", holder="x"), "amount"),
    ("ReleaseHold", wallet_pb2.ReleaseHoldRequest(idempotency_key="k-bad-23", hold_id="abc"), "hold_id"),
    ("ListTransfers", wallet_pb2.ListTransfersRequest(page_token="garbage"), "page_token"),
    ("ListTransfers", wallet_pb2.ListTransfersRequest(page_size=5000), "page_size"),
]


@pytest.mark.parametrize("method,request_,field", BAD_REQUESTS, ids=[f"{m}-{f}-{i}" for i, (m, _, f) in enumerate(BAD_REQUESTS)])
async def test_bad_input_is_invalid_argument_and_writes_nothing(wallet, wallet_db, method, request_, field) -> None:
    await deposit(wallet, "alice", "1")  # so that nothing fails for lack of funds
    before = await snapshot(wallet_db)
    metadata = OPERATOR
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(wallet, method)(request_, metadata=metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(field + ":"), err.value.details()
    assert await snapshot(wallet_db) == before


async def test_deny_by_default(wallet) -> None:
    request = wallet_pb2.DepositRequest(idempotency_key=unique(), owner="alice", asset="BTC", amount="1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet.Deposit(request)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet.Deposit(request, metadata=(("authorization", "Bearer wrong"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet.Deposit(request, metadata=GATEWAY)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet.GetLedgerTotals(wallet_pb2.GetLedgerTotalsRequest(), metadata=SERVICE)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_randomized_workload_keeps_every_asset_at_zero(wallet, wallet_db) -> None:
    rng = random.Random(20261126)
    users = [unique("u") for _ in range(8)]
    assets = ["BTC", "USDT", "ETH"]
    for user in users:
        for asset in assets:
            await deposit(wallet, user, "100", asset)
    holds: list[str] = []

    async def step(i: int) -> None:
        asset = rng.choice(assets)
        a, b = rng.sample(users, 2)
        amount = str(Decimal(rng.randint(1, 3_000_000)).scaleb(-6))
        kind = rng.choice(["transfer", "batch", "hold", "release", "capture", "withdraw", "expense"])
        try:
            if kind == "transfer":
                await wallet.Transfer(wallet_pb2.TransferRequest(idempotency_key=unique(), transfer=spec(a, b, amount, asset)), metadata=SERVICE)
            elif kind == "batch":
                await wallet.TransferBatch(
                    wallet_pb2.TransferBatchRequest(idempotency_key=unique(), transfers=[spec(a, b, amount, asset), spec(b, a, amount, asset)]), metadata=SERVICE
                )
            elif kind == "hold":
                reply = await wallet.PlaceHold(
                    wallet_pb2.PlaceHoldRequest(idempotency_key=unique(), owner=a, asset=asset, amount=amount, holder="test"), metadata=SERVICE
                )
                holds.append(reply.hold.hold_id)
            elif kind in ("release", "capture") and holds:
                hold_id = rng.choice(holds)
                if kind == "release":
                    await wallet.ReleaseHold(wallet_pb2.ReleaseHoldRequest(idempotency_key=unique(), hold_id=hold_id, amount="0.5"), metadata=SERVICE)
                else:
                    await wallet.CaptureHold(
                        wallet_pb2.CaptureHoldRequest(idempotency_key=unique(), hold_id=hold_id, destination=wallet_pb2.AccountRef(owner="launchpool", kind=TREASURY)),
                        metadata=SERVICE,
                    )
            elif kind == "withdraw":
                await wallet.Withdraw(wallet_pb2.WithdrawRequest(idempotency_key=unique(), owner=a, asset=asset, amount=amount), metadata=OPERATOR)
            elif kind == "expense":
                await wallet.Transfer(
                    wallet_pb2.TransferRequest(idempotency_key=unique(), transfer=spec("simple_earn", a, amount, asset, src_kind=EXPENSE)), metadata=SERVICE
                )
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()

    for chunk in range(0, 400, 40):
        await asyncio.gather(*(step(i) for i in range(chunk, chunk + 40)))

    totals = await wallet.GetLedgerTotals(wallet_pb2.GetLedgerTotalsRequest(), metadata=OPERATOR)
    assert totals.totals
    for total in totals.totals:
        assert Decimal(total.sum) == 0, total
        assert total.negative_user_accounts == 0
    mismatched = await wallet_db.fetch(
        "SELECT a.owner, a.asset FROM accounts a LEFT JOIN"
        " (SELECT owner, asset, sum(remaining) AS held FROM holds GROUP BY owner, asset) h USING (owner, asset)"
        " WHERE a.kind = 'hold' AND a.balance <> coalesce(h.held, 0)"
    )
    assert mismatched == []


async def test_bulk_credit_batch_counts_at_once_and_folds_exactly(wallet, wallet_db) -> None:
    users = [unique("payee") for _ in range(200)]
    for user in users[:50]:
        await deposit(wallet, user, "1", "USDT")
    payout = wallet_pb2.TransferBatchRequest(
        idempotency_key=unique(),
        transfers=[spec("simple_earn", u, f"0.{i + 1:06d}", "USDT", src_kind=EXPENSE) for i, u in enumerate(users)],
    )
    reply = await wallet.TransferBatch(payout, metadata=SERVICE)
    assert reply.transfer_count == 200
    assert await wallet.TransferBatch(payout, metadata=SERVICE) == reply  # idempotent
    expected = {u: (Decimal(1) if i < 50 else 0) + Decimal(f"0.{i + 1:06d}") for i, u in enumerate(users)}

    # Spend from some payees while their credits may still be pending, concurrently with
    # another payout to the same users: every balance stays exact.
    second = wallet_pb2.TransferBatchRequest(
        idempotency_key=unique(), transfers=[spec("simple_earn", u, "0.5", "USDT", src_kind=EXPENSE) for u in users]
    )
    spends = [
        wallet.Transfer(wallet_pb2.TransferRequest(idempotency_key=unique(), transfer=spec(u, "sink", "0.25", "USDT")), metadata=SERVICE)
        for u in users[:50]
    ]
    await asyncio.gather(wallet.TransferBatch(second, metadata=SERVICE), *spends)
    for i, user in enumerate(users):
        expected[user] += Decimal("0.5") - (Decimal("0.25") if i < 50 else 0)
    for user in users:
        assert await balance(wallet, user, "USDT") == expected[user], user
    totals = {t.asset: t for t in (await wallet.GetLedgerTotals(wallet_pb2.GetLedgerTotalsRequest(), metadata=OPERATOR)).totals}
    assert Decimal(totals["USDT"].sum) == 0

    # The background folder folds every bulk credit into transfers; balances do not move.
    await eventually(lambda: wallet_db.fetchval("SELECT count(*) = 0 FROM bulk_credit_parts"))
    for user in users:
        assert await balance(wallet, user, "USDT") == expected[user], user
    folded = await wallet_db.fetchval(
        "SELECT count(*) FROM transfers t JOIN postings p ON p.id = t.posting_id WHERE t.posting_id = ANY($1::bigint[])",
        [int(reply.posting_id)],
    )
    assert folded == 200
