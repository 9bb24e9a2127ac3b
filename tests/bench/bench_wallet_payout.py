"""Wallet payout throughput: BulkCredit of N credits (requests of 10,000, one expense
account to N distinct users) through gRPC against the local PostgreSQL, then the
background fold of those credits into per-user transfers and balances, timed apart.

Three rounds on one database: to N users without accounts (the fold creates them), to
the same users again (accounts exist), and once more with the folder running during the
payout (what production does). The payout's clock runs from the first request sent to
the last response; the fold's from the folder process being ready to the last credit
folded. Requests are serialized before the clock starts, so the client's work is only
sending them. The wallet's outbox relay publishes the events to Kafka meanwhile, as in
production. Each round checks the ledger: totals zero, the source debited exactly, one
transfer per credit once folded; and prints where the CPU went during the payout.

    .venv/bin/python -m tests.bench.bench_wallet_payout --users 1000000
    .venv/bin/python -m tests.bench.bench_wallet_payout --users 100000 --batch 5000 --in-flight 4 --references
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from decimal import Decimal
from functools import cache

import asyncpg
import grpc
from services.kernel import grpcclient

from earn.v1 import wallet_pb2
from services.kernel.config import Settings
from tests.bench._common import CpuMeter, drop_database, header, recreate_database, spawn
from tests.conftest import OPERATOR, SERVICE, delete_topics_and_groups

DATABASE = "earn_bench_wallet"
ASSET = "USDT"
METHOD = "/earn.v1.WalletService/BulkCredit"


def requests(users: int, batch: int, tag: str, references: bool) -> list[bytes]:
    """Serialized BulkCreditRequests: user i gets 0.000001 x (i mod 999,999 + 1) USDT."""
    source = wallet_pb2.AccountRef(owner="simple_earn", kind=wallet_pb2.ACCOUNT_KIND_EXPENSE)
    out = []
    for first in range(0, users, batch):
        ids = range(first, min(first + batch, users))
        request = wallet_pb2.BulkCreditRequest(
            idempotency_key=f"bench:{tag}:{first}",
            asset=ASSET,
            source=source,
            owners=[f"user-{i}" for i in ids],
            amounts=[f"0.{i % 999_999 + 1:06d}" for i in ids],
            reference=f"simple_earn:interest:usdt-flex:{tag}",
        )
        if references:
            request.references.extend(f"simple_earn:interest:{tag}:position-{i}" for i in ids)
        out.append(request.SerializeToString())
    return out


@cache
def expected_per_round(users: int) -> Decimal:
    return sum((Decimal(i % 999_999 + 1).scaleb(-6) for i in range(users)), Decimal(0))


async def payout(channel: grpc.aio.Channel, bodies: list[bytes], in_flight: int) -> float:
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=wallet_pb2.BulkCreditResponse.FromString)
    queue = list(reversed(bodies))

    async def worker() -> None:
        while queue:
            await call(queue.pop(), metadata=SERVICE, timeout=300)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return time.perf_counter() - started


async def wait_folded(pool: asyncpg.Pool, timeout: float = 1800) -> float:
    """Wait until every bulk credit is folded; returns the seconds waited."""
    started = time.perf_counter()
    while await pool.fetchval("SELECT count(*) FROM bulk_credits WHERE folded_at IS NULL"):
        if time.perf_counter() - started > timeout:
            raise TimeoutError("bulk credits not folded in time")
        await asyncio.sleep(0.05)
    return time.perf_counter() - started


async def fold_seconds(pool: asyncpg.Pool, since: int) -> float:
    """How long the folder took for the bulk credits after posting ``since``, from the
    commit times of the folds (n folds span n - 1 intervals), so the folder process's
    start-up does not count."""
    n, span = await pool.fetchrow(
        "SELECT count(*), extract(epoch FROM max(folded_at) - min(folded_at)) FROM bulk_credits WHERE posting_id > $1", since
    )
    return float(span) * n / (n - 1) if n > 1 else float("nan")


async def check(pool: asyncpg.Pool, stub_channel: grpc.aio.Channel, users: int, rounds: int) -> None:
    totals = await stub_channel.unary_unary(
        "/earn.v1.WalletService/GetLedgerTotals",
        request_serializer=wallet_pb2.GetLedgerTotalsRequest.SerializeToString,
        response_deserializer=wallet_pb2.GetLedgerTotalsResponse.FromString,
    )(wallet_pb2.GetLedgerTotalsRequest(), metadata=OPERATOR)
    assert all(Decimal(t.sum) == 0 for t in totals.totals), totals
    paid = await pool.fetchval("SELECT -balance FROM accounts WHERE owner = 'simple_earn' AND kind = 'expense'")
    assert paid == expected_per_round(users) * rounds, (paid, rounds)


async def main(users: int, batch: int, in_flight: int, references: bool) -> None:
    header(f"wallet payout: BulkCredit of {users:,} credits in requests of {batch:,} through gRPC, then the fold")
    settings = Settings()
    await recreate_database(settings, DATABASE)
    prefix = f"bench{os.getpid()}."
    env = {**os.environ, "EARN_PG_DATABASE": DATABASE, "EARN_TOPIC_PREFIX": prefix, "EARN_LOG_LEVEL": "WARNING"}
    log_dir = settings.data_dir / "bench-logs"
    wallet = spawn("wallet", {**env, "EARN_FOLD_ENABLED": "false"}, log_dir)  # its relay publishes as in production
    wallet.start()
    pool = None
    try:
        wallet.wait_ready(60)
        pool = await asyncpg.create_pool(
            settings.database_url.rsplit("/", 1)[0] + f"/{DATABASE}", server_settings={"search_path": "wallet"}, min_size=1, max_size=2
        )
        rounds = [("new accounts", "first", False), ("accounts exist", "second", False), ("folder running", "third", True)]
        bodies = {tag: requests(users, batch, tag, references) for _, tag, _ in rounds}
        size = sum(map(len, bodies["first"])) / len(bodies["first"])
        print(f"{len(bodies['first'])} requests per round, {size / 1024:,.0f} KiB each; {in_flight} in flight;"
              f" per-credit references: {'yes' if references else 'no (one reference per request)'}")
        options = [("grpc.max_send_message_length", 64 << 20)]
        async with grpcclient.channel(wallet.address, options=options) as channel:
            for n, (label, tag, folder_during) in enumerate(rounds, start=1):
                folder = spawn("wallet", {**env, "EARN_RELAY_ENABLED": "false", "EARN_FOLD_IDLE_SECONDS": "0.05"}, log_dir)
                if folder_during:
                    folder.start()
                    folder.wait_ready(60)
                since = await pool.fetchval("SELECT coalesce(max(posting_id), 0) FROM bulk_credits")
                cpu = CpuMeter({"wallet process (gRPC, validation)": wallet.pid, "folder process": folder.pid or -1}, pool, DATABASE, every=0.2)
                await cpu.begin()
                elapsed = await payout(channel, bodies[tag], in_flight)
                usage = await cpu.end()
                await check(pool, channel, users, n)
                if not folder_during:
                    folder.start()
                    folder.wait_ready(60)
                fold = await wait_folded(pool)
                if not folder_during:
                    fold = await fold_seconds(pool, since)
                folder.stop()
                await check(pool, channel, users, n)
                transfers = await pool.fetchval("SELECT count(*) FROM transfers")
                assert transfers == users * n, transfers
                if folder_during:
                    print(f"  {label:>15}: payout {elapsed:6.2f} s ({users / elapsed:>9,.0f} credits/s) while folding;"
                          f" all folded {fold:6.2f} s after the last response")
                else:
                    print(f"  {label:>15}: payout {elapsed:6.2f} s ({users / elapsed:>9,.0f} credits/s);"
                          f" fold {fold:6.2f} s ({users / fold:>7,.0f} credits/s)")
                busy = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(usage.items(), key=lambda kv: -kv[1]) if v >= 0.05)
                print(f"  {'':>15}  CPU during the payout: {busy}")
        print("  checked after each payout and fold: ledger sums zero, source debited exactly, one transfer per credit")
    finally:
        if pool is not None:
            await pool.close()
        wallet.stop()
        await drop_database(settings, DATABASE)
        await asyncio.to_thread(delete_topics_and_groups, settings, prefix)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000, help="credits per round (distinct users)")
    parser.add_argument("--batch", type=int, default=10_000, help="credits per BulkCredit request (at most 10,000)")
    parser.add_argument("--in-flight", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--references", action="store_true", help="a reference per credit instead of one per request")
    args = parser.parse_args()
    asyncio.run(main(args.users, args.batch, args.in_flight, args.references))
