"""Wallet payout throughput: N credits from one expense account to N users, through gRPC
TransferBatch in batches of 10,000 (the path a payout job takes), against the local
PostgreSQL. First payout creates the accounts; the second finds them.

    make bench            # all benchmarks
    .venv/bin/python tests/bench/bench_wallet_payout.py --users 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from decimal import Decimal

import asyncpg
import grpc

from earn.v1 import wallet_pb2, wallet_pb2_grpc
from services.devstack.processes import PROCESSES, ManagedProcess
from services.kernel.config import Settings
from tests.conftest import SERVICE, free_port

BATCH = 10_000


async def payout(stub: wallet_pb2_grpc.WalletServiceStub, users: int, tag: str) -> float:
    started = time.perf_counter()
    expense = wallet_pb2.AccountRef(owner="simple_earn", kind=wallet_pb2.ACCOUNT_KIND_EXPENSE)

    async def batch(first: int) -> None:
        request = wallet_pb2.TransferBatchRequest(
            idempotency_key=f"bench:{tag}:{first}",
            transfers=[
                wallet_pb2.TransferSpec(
                    asset="USDT", source=expense,
                    destination=wallet_pb2.AccountRef(owner=f"user-{i}", kind=wallet_pb2.ACCOUNT_KIND_FUNDING),
                    amount="0.012345",
                )
                for i in range(first, min(first + BATCH, users))
            ],
        )
        await stub.TransferBatch(request, metadata=SERVICE, timeout=120)

    # Two requests in flight: one is being encoded while the other is in PostgreSQL.
    queue = list(range(0, users, BATCH))

    async def worker() -> None:
        while queue:
            await batch(queue.pop(0))

    await asyncio.gather(worker(), worker())
    return time.perf_counter() - started


async def main(users: int) -> None:
    base = Settings()
    database = "earn_bench_wallet"
    admin = await asyncpg.connect(base.database_url.rsplit("/", 1)[0] + "/postgres")
    await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{database}"')
    spec = next(s for s in PROCESSES if s.name == "wallet")
    proc = ManagedProcess(
        spec, {**os.environ, "EARN_PG_DATABASE": database, "EARN_TOPIC_PREFIX": "bench.", "EARN_LOG_LEVEL": "WARNING"},
        log_dir=base.data_dir / "bench-logs", port=free_port(), metrics_port=free_port(), echo=False,
    )
    proc.start()
    try:
        proc.wait_ready(60)
        async with grpc.aio.insecure_channel(proc.address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            stub = wallet_pb2_grpc.WalletServiceStub(channel)
            first = await payout(stub, users, "first")
            second = await payout(stub, users, "second")
            totals = await stub.GetLedgerTotals(wallet_pb2.GetLedgerTotalsRequest(), metadata=(("authorization", "Bearer dev-operator"),))
        assert all(Decimal(t.sum) == 0 for t in totals.totals)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        print(f"wallet payout of {users:,} credits in batches of {BATCH:,} through gRPC:")
        print(f"  first payout (creates {users:,} accounts): {first:6.2f} s  ({users / first:,.0f} credits/s)")
        print(f"  second payout (accounts exist):        {second:6.2f} s  ({users / second:,.0f} credits/s)")
    finally:
        proc.stop()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=1_000_000)
    asyncio.run(main(parser.parse_args().users))
