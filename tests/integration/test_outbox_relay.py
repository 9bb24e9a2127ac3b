"""Outbox -> Kafka: every wallet posting reaches an idempotent consumer exactly once,
also when the relay is SIGKILLed mid-stream and restarted."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer

from earn.v1 import wallet_pb2, wallet_pb2_grpc
from services.kernel import db, events, inbox
from services.kernel.topics import topic_name
from tests.conftest import OPERATOR, unique


async def _consume_into_sink(stack, sink: asyncpg.Pool, expected: set[str], timeout: float = 60) -> int:
    """Read wallet.transfers from the start; apply each event once via the kernel inbox.
    Returns how many deliveries were duplicates (skipped by the inbox)."""
    consumer = AIOKafkaConsumer(
        topic_name(stack.settings, "wallet.transfers"),
        bootstrap_servers=stack.settings.kafka_bootstrap,
        group_id=f"sink-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    duplicates = 0
    try:
        async def drain() -> None:
            nonlocal duplicates
            while not expected <= set(await sink.fetchval("SELECT coalesce(array_agg(posting_id), '{}') FROM applied")):
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        env = events.parse(record.value)
                        posted = events.unwrap(env, wallet_pb2.TransfersPosted)
                        async with sink.acquire() as conn, conn.transaction():
                            if await inbox.first_time(conn, "sink", env.event_id):
                                await conn.execute("INSERT INTO applied (posting_id) VALUES ($1)", posted.posting_id)
                            else:
                                duplicates += 1

        await asyncio.wait_for(drain(), timeout)
    finally:
        await consumer.stop()
    return duplicates


async def test_events_exactly_once_through_relay_crash(stack, wallet_channel, wallet_relay, wallet_db) -> None:
    wallet = wallet_pb2_grpc.WalletServiceStub(wallet_channel)
    await db.migrate(stack.settings, "outbox_sink", Path("/nonexistent"))
    sink = await asyncpg.create_pool(stack.settings.database_url, server_settings={"search_path": "outbox_sink"}, min_size=1, max_size=2)
    assert sink is not None
    # posting_id is unique: a second application of one event would fail loudly here.
    await sink.execute("CREATE TABLE IF NOT EXISTS applied (posting_id text PRIMARY KEY)")
    try:
        owner = unique("relay")
        start = await wallet_db.fetchval("SELECT coalesce(max(id), 0) FROM postings")

        async def produce(n: int) -> None:
            for _ in range(n):
                await wallet.Deposit(
                    wallet_pb2.DepositRequest(idempotency_key=unique(), owner=owner, asset="USDT", amount="1"), metadata=OPERATOR
                )

        producing = asyncio.create_task(produce(300))
        # Kill the relay while postings keep coming, after it has published some.
        while await wallet_db.fetchval("SELECT count(*) FROM postings WHERE id > $1", start) < 60:
            await asyncio.sleep(0.05)
        wallet_relay.kill()
        await asyncio.sleep(0.5)
        assert await wallet_db.fetchval("SELECT count(*) FROM outbox") > 0  # events wait while no relay runs
        wallet_relay.start()
        await producing
        expected = {str(r["id"]) for r in await wallet_db.fetch("SELECT id FROM postings WHERE id > $1", start)}
        assert len(expected) == 300

        await _consume_into_sink(stack, sink, expected)
        applied = {r["posting_id"] for r in await sink.fetch("SELECT posting_id FROM applied")}
        assert expected <= applied
        # The relay drains the outbox completely.
        for _ in range(100):
            if await wallet_db.fetchval("SELECT count(*) FROM outbox") == 0:
                break
            await asyncio.sleep(0.1)
        assert await wallet_db.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        await sink.close()
