"""WalletService.BulkCredit through gRPC against the real PostgreSQL and Kafka.

The module's wallet process does not fold: its bulk credits stay in their columns until
a test starts a folder (a second wallet process with folding on), so every test sees
the unfolded state first, then the folded one. The crash test SIGKILLs folders mid-fold.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal

import asyncpg
import grpc
from services.kernel import grpcclient
import pytest
from aiokafka import AIOKafkaConsumer

from earn.v1 import wallet_pb2, wallet_pb2_grpc
from services.devstack.processes import ManagedProcess
from services.kernel import events
from services.kernel.topics import topic_name
from tests.conftest import GATEWAY, OPERATOR, SERVICE, Env, eventually, unique

FUNDING = wallet_pb2.ACCOUNT_KIND_FUNDING
HOLD = wallet_pb2.ACCOUNT_KIND_HOLD
EXPENSE = wallet_pb2.ACCOUNT_KIND_EXPENSE
SOURCE = wallet_pb2.AccountRef(owner="simple_earn", kind=EXPENSE)


@pytest.fixture(scope="module")
def api_process(stack: Env) -> Iterator[ManagedProcess]:
    """The wallet serving gRPC (with its relay), never folding."""
    proc = stack.process("wallet", EARN_FOLD_ENABLED="false")
    proc.start()
    proc.wait_ready(timeout=60)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
async def wallet(api_process: ManagedProcess) -> AsyncIterator[wallet_pb2_grpc.WalletServiceStub]:
    assert api_process.address
    async with grpcclient.channel(api_process.address) as channel:
        yield wallet_pb2_grpc.WalletServiceStub(channel)


@pytest.fixture(scope="module")
async def db(stack: Env, api_process: ManagedProcess) -> AsyncIterator[asyncpg.Pool]:
    """Direct access to the wallet's tables, for checking invariants only."""
    pool = await asyncpg.create_pool(stack.settings.database_url, server_settings={"search_path": "wallet"}, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


def folder_process(stack: Env) -> ManagedProcess:
    return stack.process("wallet", EARN_RELAY_ENABLED="false", EARN_FOLD_IDLE_SECONDS="0.05")


@contextlib.contextmanager
def folding(stack: Env) -> Iterator[ManagedProcess]:
    proc = folder_process(stack)
    proc.start()
    try:
        proc.wait_ready(timeout=60)
        yield proc
    finally:
        proc.stop()


async def unfolded(db: asyncpg.Pool) -> int:
    return await db.fetchval("SELECT count(*) FROM bulk_credits WHERE folded_at IS NULL")


async def fold_all(stack: Env, db: asyncpg.Pool) -> None:
    with folding(stack):
        await eventually(lambda: unfolded_is_zero(db), timeout=120)


async def unfolded_is_zero(db: asyncpg.Pool) -> bool:
    return await unfolded(db) == 0


def bulk(owners: list[str], amounts: list[str], *, key: str | None = None, asset: str = "USDT", **extra) -> wallet_pb2.BulkCreditRequest:  # type: ignore[no-untyped-def]
    return wallet_pb2.BulkCreditRequest(
        idempotency_key=key or unique("bulk"), asset=asset, source=SOURCE, owners=owners, amounts=amounts, **extra
    )


async def deposit(wallet: wallet_pb2_grpc.WalletServiceStub, owner: str, amount: str, asset: str = "USDT") -> None:
    await wallet.Deposit(wallet_pb2.DepositRequest(idempotency_key=unique("dep"), owner=owner, asset=asset, amount=amount), metadata=OPERATOR)


async def balance(wallet: wallet_pb2_grpc.WalletServiceStub, owner: str, asset: str = "USDT", kind: int = FUNDING) -> Decimal:
    reply = await wallet.GetBalances(wallet_pb2.GetBalancesRequest(owner=owner, asset=asset), metadata=GATEWAY)
    return sum((Decimal(b.balance) for b in reply.balances if b.kind == kind), Decimal(0))


async def ledger_sums(wallet: wallet_pb2_grpc.WalletServiceStub) -> dict[str, Decimal]:
    reply = await wallet.GetLedgerTotals(wallet_pb2.GetLedgerTotalsRequest(), metadata=OPERATOR)
    assert all(t.negative_user_accounts == 0 for t in reply.totals)
    return {t.asset: Decimal(t.sum) for t in reply.totals}


async def snapshot(db: asyncpg.Pool) -> tuple:
    """Everything a write could change. (An event cannot exist without its posting.)"""
    return tuple(
        await db.fetchrow(
            "SELECT (SELECT count(*) FROM accounts), (SELECT coalesce(sum(abs(balance)), 0) FROM accounts),"
            " (SELECT count(*) FROM postings), (SELECT count(*) FROM transfers), (SELECT count(*) FROM bulk_credits),"
            " (SELECT count(*) FROM bulk_credit_parts), (SELECT count(*) FROM idempotency_keys), (SELECT max(id) FROM postings)"
        )
    )


async def transfers_of(db: asyncpg.Pool, posting_id: str) -> dict[str, Decimal]:
    rows = await db.fetch(
        "SELECT a.owner, t.amount FROM transfers t JOIN accounts a ON a.id = t.destination_id WHERE t.posting_id = $1",
        int(posting_id),
    )
    owners = [r["owner"] for r in rows]
    assert len(owners) == len(set(owners)), "a credit was written twice"
    return {r["owner"]: r["amount"] for r in rows}


async def test_credits_count_at_once_and_fold_exactly(stack, wallet, db) -> None:
    known = [unique("known") for _ in range(20)]
    new = [unique("new") for _ in range(30)]
    for owner in known:
        await deposit(wallet, owner, "1")
    owners = known + new
    amounts = [f"0.{i + 1:06d}" for i in range(len(owners))]
    expense_before = await balance(wallet, "simple_earn", kind=EXPENSE)

    reply = await wallet.BulkCredit(bulk(owners, amounts, reference="simple_earn:interest:2026-11-26"), metadata=SERVICE)
    total = sum(map(Decimal, amounts), Decimal(0))
    assert (reply.credit_count, Decimal(reply.total)) == (50, total)
    expected = {o: (Decimal(1) if o in known else 0) + Decimal(a) for o, a in zip(owners, amounts)}

    # Unfolded: in every balance and in the ledger, before any user account is touched.
    assert await db.fetchval("SELECT count(*) FROM accounts WHERE owner = ANY($1::text[])", new) == 0
    assert await transfers_of(db, reply.posting_id) == {}
    for owner in owners:
        assert await balance(wallet, owner) == expected[owner], owner
    assert await balance(wallet, "simple_earn", kind=EXPENSE) == expense_before - total
    assert (await ledger_sums(wallet))["USDT"] == 0

    # Listing a user's transfers folds that user's credits first: the history is complete.
    listed = await wallet.ListTransfers(wallet_pb2.ListTransfersRequest(owner=new[0]), metadata=GATEWAY)
    assert [(t.posting_id, t.source.owner, t.destination.owner, t.amount, t.reference) for t in listed.transfers] == [
        (reply.posting_id, "simple_earn", new[0], amounts[20].rstrip("0"), "simple_earn:interest:2026-11-26")
    ]
    assert listed.transfers[0].transfer_id
    assert await balance(wallet, new[0]) == expected[new[0]]

    # A listing of the posting folds the rest of it.
    page = await wallet.ListTransfers(wallet_pb2.ListTransfersRequest(posting_id=reply.posting_id, page_size=1000), metadata=OPERATOR)
    assert {t.destination.owner: Decimal(t.amount) for t in page.transfers} == {o: Decimal(a) for o, a in zip(owners, amounts)}
    assert await db.fetchval("SELECT folded_at IS NOT NULL FROM bulk_credits WHERE posting_id = $1", int(reply.posting_id))
    for owner in owners:
        assert await balance(wallet, owner) == expected[owner], owner

    # Another payout to the same users, folded by the background folder.
    second = await wallet.BulkCredit(bulk(owners, ["0.5"] * len(owners)), metadata=SERVICE)
    await fold_all(stack, db)
    assert await transfers_of(db, second.posting_id) == {o: Decimal("0.5") for o in owners}
    assert await db.fetchval("SELECT count(*) FROM bulk_credit_parts WHERE posting_id = $1", int(second.posting_id)) == 0
    for owner in owners:
        assert await balance(wallet, owner) == expected[owner] + Decimal("0.5"), owner
    assert (await ledger_sums(wallet))["USDT"] == 0


async def test_debits_spend_unfolded_credits_and_never_overdraw(stack, wallet, db) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    await deposit(wallet, alice, "1")
    first = await wallet.BulkCredit(bulk([alice, bob, carol], ["2", "5", "0.25"]), metadata=SERVICE)
    second = await wallet.BulkCredit(bulk([carol, unique("x")], ["0.75", "1"]), metadata=SERVICE)

    # alice: 1 in her account, 2 unfolded. 3.5 is too much by exactly 0.5; 2.5 is fine.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet.Withdraw(wallet_pb2.WithdrawRequest(idempotency_key=unique(), owner=alice, asset="USDT", amount="3.5"), metadata=OPERATOR)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == f"insufficient funds in {alice}/USDT/funding: short by 0.5 USDT"
    await wallet.Withdraw(wallet_pb2.WithdrawRequest(idempotency_key=unique(), owner=alice, asset="USDT", amount="2.5"), metadata=OPERATOR)
    assert await balance(wallet, alice) == Decimal("0.5")

    # bob has no account yet: a hold on his unfolded credit creates it and moves funds.
    held = await wallet.PlaceHold(
        wallet_pb2.PlaceHoldRequest(idempotency_key=unique(), owner=bob, asset="USDT", amount="4", holder="simple_earn"), metadata=SERVICE
    )
    assert held.hold.remaining == "4"
    assert (await balance(wallet, bob), await balance(wallet, bob, kind=HOLD)) == (Decimal(1), Decimal(4))

    # carol: credits in two bulk credits, spent to the last unit by one transfer.
    await wallet.Transfer(
        wallet_pb2.TransferRequest(
            idempotency_key=unique(),
            transfer=wallet_pb2.TransferSpec(
                asset="USDT", source=wallet_pb2.AccountRef(owner=carol, kind=FUNDING),
                destination=wallet_pb2.AccountRef(owner=alice, kind=FUNDING), amount="1",
            ),
        ),
        metadata=SERVICE,
    )
    assert (await balance(wallet, carol), await balance(wallet, alice)) == (Decimal(0), Decimal("1.5"))

    # The debits folded their users' credits (one transfer each), the rest stays unfolded.
    assert await transfers_of(db, first.posting_id) == {alice: 2, bob: 5, carol: Decimal("0.25")}
    assert set(await transfers_of(db, second.posting_id)) == {carol}
    assert (await ledger_sums(wallet))["USDT"] == 0

    # Folding the rest writes each credit once, and no balance moves.
    await fold_all(stack, db)
    assert await transfers_of(db, first.posting_id) == {alice: 2, bob: 5, carol: Decimal("0.25")}
    assert len(await transfers_of(db, second.posting_id)) == 2
    assert [await balance(wallet, u) for u in (alice, bob, carol)] == [Decimal("1.5"), Decimal(1), Decimal(0)]
    assert (await ledger_sums(wallet))["USDT"] == 0


async def test_spending_races_the_folder_and_stays_exact(stack, wallet, db) -> None:
    users = [unique("race") for _ in range(300)]
    rng = random.Random(20261126)
    expected: dict[str, Decimal] = defaultdict(Decimal)
    postings = []
    for _ in range(6):
        chosen = rng.sample(users, 200)
        amounts = [Decimal(rng.randint(1, 2_000_000)).scaleb(-6) for _ in chosen]
        reply = await wallet.BulkCredit(bulk(chosen, [str(a) for a in amounts]), metadata=SERVICE)
        postings.append((reply.posting_id, dict(zip(chosen, amounts))))
        for owner, amount in zip(chosen, amounts):
            expected[owner] += amount

    async def spend(owner: str) -> None:
        amount = min(expected[owner], Decimal("0.9"))
        if amount <= 0:
            return
        try:
            await wallet.Withdraw(
                wallet_pb2.WithdrawRequest(idempotency_key=unique(), owner=owner, asset="USDT", amount=str(amount)), metadata=OPERATOR
            )
        except grpc.aio.AioRpcError as err:  # never: each spends less than it has
            raise AssertionError(err.details()) from err
        expected[owner] -= amount

    with folding(stack):
        # Payouts keep arriving while users spend and the folder folds.
        more = [wallet.BulkCredit(bulk(rng.sample(users, 100), ["0.01"] * 100), metadata=SERVICE) for _ in range(3)]
        extra = await asyncio.gather(*more, *(spend(u) for u in users))
        await eventually(lambda: unfolded_is_zero(db), timeout=120)
    for reply in extra[:3]:
        credited = await transfers_of(db, reply.posting_id)
        assert len(credited) == 100
        for owner in credited:
            expected[owner] += Decimal("0.01")
    for posting_id, credits in postings:
        assert await transfers_of(db, posting_id) == credits
    for owner in users:
        assert await balance(wallet, owner) == expected[owner], owner
    assert (await ledger_sums(wallet))["USDT"] == 0


async def test_postings_folding_credits_of_shared_bucket_rows_do_not_deadlock(wallet, db) -> None:
    """x and z share a bucket row of one bulk credit, y and w another: a batch x -> y and a
    batch w -> z, at once, each fold credits from both rows (20 such pairs at once). The
    rows are locked in key order (store._LOCK_PARTS_OF); this exercises it, timing may
    not make an unordered version fail."""
    candidates = [unique("share") for _ in range(3000)]
    by_bucket: dict[int, list[str]] = defaultdict(list)
    for row in await db.fetch("SELECT o, owner_bucket(o) AS b FROM unnest($1::text[]) AS o", candidates):
        by_bucket[row["b"]].append(row["o"])
    pairs = [names[:2] for names in by_bucket.values() if len(names) >= 2]
    groups = [(pairs[i][0], pairs[i + 1][0], pairs[i][1], pairs[i + 1][1]) for i in range(0, 40, 2)]  # (x, y, z, w)

    def move(src: str, dst: str) -> wallet_pb2.TransferSpec:
        return wallet_pb2.TransferSpec(
            asset="USDT", source=wallet_pb2.AccountRef(owner=src, kind=FUNDING), destination=wallet_pb2.AccountRef(owner=dst, kind=FUNDING), amount="0.25"
        )

    owners = [u for group in groups for u in group]
    await wallet.BulkCredit(bulk(owners, ["1"] * len(owners)), metadata=SERVICE)
    batches = []
    for x, y, z, w in groups:
        for src, dst in ((x, y), (w, z)):
            batches.append(wallet.TransferBatch(wallet_pb2.TransferBatchRequest(idempotency_key=unique(), transfers=[move(src, dst)]), metadata=SERVICE))
    await asyncio.gather(*batches)
    for x, y, z, w in groups:
        assert [await balance(wallet, u) for u in (x, y, z, w)] == [Decimal("0.75"), Decimal("1.25"), Decimal("1.25"), Decimal("0.75")]
    assert (await ledger_sums(wallet))["USDT"] == 0


async def test_same_key_same_answer_other_request_refused(wallet, db) -> None:
    owners = [unique("idem") for _ in range(5)]
    request = bulk(owners, ["1"] * 5, key=unique("payout"))
    replies = await asyncio.gather(*(wallet.BulkCredit(request, metadata=SERVICE) for _ in range(10)))
    assert all(r == replies[0] for r in replies)
    assert await wallet.BulkCredit(request, metadata=SERVICE) == replies[0]
    assert await db.fetchval("SELECT count(*) FROM bulk_credits WHERE posting_id = $1", int(replies[0].posting_id)) == 1
    assert [await balance(wallet, o) for o in owners] == [Decimal(1)] * 5

    before = await snapshot(db)
    other = bulk(owners, ["2"] * 5, key=request.idempotency_key)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet.BulkCredit(other, metadata=SERVICE)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert err.value.details() == f"idempotency_key: {request.idempotency_key!r} was already used for a different request"
    assert await snapshot(db) == before


NAME_RULE = "must be 1 to 64 characters of letters, digits and _ . : @ - (starting with a letter or digit)"
GRAMMAR = "is not a plain positive decimal (digits with an optional fraction; no sign, exponent, spaces, leading zeros, NaN or Infinity)"
INVALID, DENIED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION


def _bad(**fields) -> wallet_pb2.BulkCreditRequest:  # type: ignore[no-untyped-def]
    args = dict(idempotency_key="bad-bulk", asset="USDT", source=SOURCE, owners=["ann", "ben"], amounts=["1", "2"])
    args.update(fields)
    return wallet_pb2.BulkCreditRequest(**args)


BAD_REQUESTS = [
    (_bad(idempotency_key=""), SERVICE, INVALID, "idempotency_key: is required"),
    (_bad(idempotency_key="two words"), SERVICE, INVALID, "idempotency_key: must be 1 to 128 printable ASCII characters without spaces"),
    (_bad(asset="NOPE"), SERVICE, INVALID, "asset: unknown asset 'NOPE'"),
    (_bad(asset=""), SERVICE, INVALID, "asset: is required"),
    (_bad(source=wallet_pb2.AccountRef(owner="simple_earn")), SERVICE, INVALID, "source.kind: is required"),
    (_bad(source=wallet_pb2.AccountRef(owner="", kind=EXPENSE)), SERVICE, INVALID, "source.owner: is required"),
    (_bad(source=wallet_pb2.AccountRef(owner="ann", kind=FUNDING)), SERVICE, INVALID,
     "source.kind: must be an account that may go negative (expense or external); a funding account may not"),
    (_bad(source=wallet_pb2.AccountRef(owner="dual", kind=wallet_pb2.ACCOUNT_KIND_TREASURY)), SERVICE, INVALID,
     "source.kind: must be an account that may go negative (expense or external); a treasury account may not"),
    (_bad(source=wallet_pb2.AccountRef(owner="pool", kind=wallet_pb2.ACCOUNT_KIND_REWARD_POOL)), SERVICE, INVALID,
     "source.kind: must be an account that may go negative (expense or external); a reward_pool account may not"),
    (_bad(source=wallet_pb2.AccountRef(owner="ann", kind=HOLD)), SERVICE, INVALID,
     "source.kind: must be an account that may go negative (expense or external); a hold account may not"),
    (_bad(owners=[], amounts=[]), SERVICE, INVALID, "owners: must hold at least one owner"),
    (_bad(owners=[f"u{i}" for i in range(10_001)], amounts=["1"] * 10_001), SERVICE, INVALID, "owners: at most 10000 credits per request; got 10001"),
    (_bad(owners=["ann", "ben", "ann"], amounts=["1", "2", "3"]), SERVICE, INVALID, "owners[2]: 'ann' is already credited at owners[0]: owners must be distinct"),
    (_bad(owners=["ann", "b n"]), SERVICE, INVALID, f"owners[1]: {NAME_RULE}"),
    (_bad(owners=["ann", ""]), SERVICE, INVALID, "owners[1]: is required"),
    (_bad(owners=["-ann", "ben"]), SERVICE, INVALID, f"owners[0]: {NAME_RULE}"),
    (_bad(owners=["ann\nben", "cy"]), SERVICE, INVALID, f"owners[0]: {NAME_RULE}"),
    (_bad(owners=["ann", "x" * 65]), SERVICE, INVALID, f"owners[1]: {NAME_RULE}"),
    (_bad(amounts=["1"]), SERVICE, INVALID, "amounts: has 1 entries for 2 owners: one amount per owner"),
    (_bad(references=["r"]), SERVICE, INVALID, "references: has 1 entries for 2 owners: one per owner, or none (then reference applies to each)"),
    (_bad(amounts=["1", "1e3"]), SERVICE, INVALID, f"amounts[1]: '1e3' {GRAMMAR}"),
    (_bad(amounts=["-1", "1"]), SERVICE, INVALID, f"amounts[0]: '-1' {GRAMMAR}"),
    (_bad(amounts=["1", "NaN"]), SERVICE, INVALID, f"amounts[1]: 'NaN' {GRAMMAR}"),
    (_bad(amounts=["1", " 2"]), SERVICE, INVALID, f"amounts[1]: ' 2' {GRAMMAR}"),
    (_bad(amounts=["1", ""]), SERVICE, INVALID, 'amounts[1]: is required (a decimal string such as "1.5")'),
    (_bad(amounts=["1", "0.0000001"]), SERVICE, INVALID, "amounts[1]: has 7 fraction digits; at most 6 allowed"),
    (_bad(amounts=["0", "1"]), SERVICE, INVALID, "amounts[0]: must be greater than zero"),
    (_bad(amounts=["1", "0.000000"]), SERVICE, INVALID, "amounts[1]: must be greater than zero"),
    (_bad(amounts=["1", "1" * 21]), SERVICE, INVALID, "amounts[1]: is too large: at most 20 integer digits"),
    (_bad(amounts=["9" * 20, "9" * 20]), SERVICE, INVALID,
     "amounts: their total, or the source's balance after it, exceeds the ledger's 20 integer digits"),
    (_bad(references=["ok", "\x07"]), SERVICE, INVALID, "references[1]: must be at most 128 printable ASCII characters"),
    (_bad(reference="x" * 129), SERVICE, INVALID, "reference: must be at most 128 printable ASCII characters"),
    (_bad(), GATEWAY, grpc.StatusCode.PERMISSION_DENIED, "role 'gateway' may not call earn.v1.WalletService/BulkCredit"),
    (_bad(), (), grpc.StatusCode.UNAUTHENTICATED, "authorization: a valid 'Bearer <token>' is required"),
]


@pytest.mark.parametrize("request_,metadata,code,message", BAD_REQUESTS, ids=[f"{i}-{m.split(':')[0]}" for i, (_, _, _, m) in enumerate(BAD_REQUESTS)])
async def test_bad_input_is_refused_precisely_and_writes_nothing(wallet, db, request_, metadata, code, message) -> None:
    before = await snapshot(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet.BulkCredit(request_, metadata=metadata)
    assert (err.value.code(), err.value.details()) == (code, message)
    assert await snapshot(db) == before


async def test_the_posting_is_one_event_in_columns(stack, wallet) -> None:
    owners = [unique("ev") for _ in range(3)]
    reply = await wallet.BulkCredit(
        bulk(owners, ["1.5", "0.000001", "2.50"], references=["r:0", "r:1", "r:2"]), metadata=SERVICE
    )
    expense = await balance(wallet, "simple_earn", kind=EXPENSE)
    consumer = AIOKafkaConsumer(
        topic_name(stack.settings, "wallet.transfers"),
        bootstrap_servers=stack.settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        async def find() -> tuple[wallet_pb2.TransfersPosted, object]:
            while True:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        env = events.parse(record.value)
                        if env.key == reply.posting_id:
                            return events.unwrap(env, wallet_pb2.TransfersPosted), env

        posted, env = await asyncio.wait_for(find(), 60)
    finally:
        await consumer.stop()
    assert (posted.posting_id, posted.posting_kind, list(posted.transfers)) == (reply.posting_id, "bulk_credit", [])
    assert posted.created_at == reply.created_at
    credit = posted.bulk_credit
    assert (credit.asset, credit.source) == ("USDT", SOURCE)
    assert list(credit.owners) == owners
    assert list(credit.amounts) == ["1.5", "0.000001", "2.50"]
    assert list(credit.references) == ["r:0", "r:1", "r:2"] and credit.reference == ""
    assert list(credit.transfer_ids) == []  # known once folded (ListTransfers)
    # No posting of this source since: its balance after this one is its balance now.
    assert Decimal(credit.source_balance_after) == expense


async def test_transfer_batch_payout_is_stored_as_a_bulk_credit(stack, wallet, db) -> None:
    owners = [unique("batch") for _ in range(64)]
    request = wallet_pb2.TransferBatchRequest(
        idempotency_key=unique(),
        transfers=[
            wallet_pb2.TransferSpec(
                asset="USDT", source=SOURCE, destination=wallet_pb2.AccountRef(owner=o, kind=FUNDING), amount="0.1", reference=f"p:{i}"
            )
            for i, o in enumerate(owners)
        ],
    )
    reply = await wallet.TransferBatch(request, metadata=SERVICE)
    assert reply.transfer_count == 64
    assert await db.fetchval("SELECT credit_count FROM bulk_credits WHERE posting_id = $1", int(reply.posting_id)) == 64
    assert [await balance(wallet, o) for o in owners] == [Decimal("0.1")] * 64
    await fold_all(stack, db)
    rows = await db.fetch("SELECT reference FROM transfers WHERE posting_id = $1", int(reply.posting_id))
    assert sorted(r["reference"] for r in rows) == sorted(f"p:{i}" for i in range(64))


# A fold statement running in a wallet's backend (not this query, which names them too).
FOLD_STATEMENT = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'wallet'"
    " AND pid <> pg_backend_pid() AND state = 'active' AND (query LIKE '%WITH locked AS%' OR query LIKE '%WITH credit AS%')"
)


async def test_sigkill_while_folding_leaves_each_bulk_credit_folded_or_not_and_pays_once(stack, wallet, db) -> None:
    rng = random.Random(424242)
    users = [unique("crash") for _ in range(4000)]
    for owner in users[:500]:
        await deposit(wallet, owner, "1")
    expected = {o: Decimal(1) if i < 500 else Decimal(0) for i, o in enumerate(users)}
    credits: dict[str, dict[str, Decimal]] = {}
    for _ in range(12):
        chosen = rng.sample(users, 3000)
        amounts = [Decimal(rng.randint(1, 10**7)).scaleb(-6) for _ in chosen]
        reply = await wallet.BulkCredit(bulk(chosen, [str(a) for a in amounts]), metadata=SERVICE)
        credits[reply.posting_id] = dict(zip(chosen, amounts))
        for owner, amount in zip(chosen, amounts):
            expected[owner] += amount

    async def each_folded_or_not() -> None:
        rows = await db.fetch(
            "SELECT b.posting_id, b.credit_count, b.total, b.folded_at IS NOT NULL AS folded,"
            " (SELECT count(*) FROM bulk_credit_parts p WHERE p.posting_id = b.posting_id) AS parts,"
            " (SELECT coalesce(sum(total), 0) FROM bulk_credit_parts p WHERE p.posting_id = b.posting_id) AS unfolded,"
            " (SELECT count(*) FROM transfers t WHERE t.posting_id = b.posting_id) AS written,"
            " (SELECT coalesce(sum(amount), 0) FROM transfers t WHERE t.posting_id = b.posting_id) AS paid"
            " FROM bulk_credits b WHERE b.posting_id = ANY($1::bigint[])",
            [int(p) for p in credits],
        )
        for r in rows:
            if r["folded"]:
                assert (r["parts"], r["written"], r["paid"]) == (0, r["credit_count"], r["total"]), dict(r)
            else:
                assert (r["written"], r["paid"], r["unfolded"]) == (0, 0, r["total"]), dict(r)

    # Three folders, each SIGKILLed in the middle of a fold statement: the first during its
    # first fold, the others after they folded a few bulk credits.
    kills_mid_fold = 0
    for run in range(3):
        proc = folder_process(stack)
        proc.start()
        deadline = time.monotonic() + 60
        target = await unfolded(db) - 2 * run
        while not (await unfolded(db) <= target and await db.fetchval(FOLD_STATEMENT)):
            assert time.monotonic() < deadline, "the folder never started folding"
            assert proc.running(), "the folder exited"
        proc.kill()
        kills_mid_fold += 1
        # The killed backend rolls its transaction back once it notices its client is gone.
        await eventually(lambda: db.fetchval(f"SELECT ({FOLD_STATEMENT}) = 0"), timeout=30)
        await each_folded_or_not()
    assert kills_mid_fold == 3
    assert 0 < await unfolded(db) < len(credits), "the kills left no mix of folded and unfolded bulk credits"

    await fold_all(stack, db)
    await each_folded_or_not()
    for posting_id, paid in credits.items():
        assert await transfers_of(db, posting_id) == paid
    for owner in users:
        assert await balance(wallet, owner) == expected[owner], owner
    assert (await ledger_sums(wallet))["USDT"] == 0
