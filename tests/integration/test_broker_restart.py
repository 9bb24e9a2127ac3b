"""The outbox relay survives a broker restart: events committed while Kafka is down are
published once it is back, none lost. Uses a private broker and database so the shared
ones stay up for the rest of the suite."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from services.kernel import grpcclient
from aiokafka import AIOKafkaConsumer

from earn.v1 import wallet_pb2, wallet_pb2_grpc
from services.devstack.infra import Kafka
from services.kernel import events
from services.kernel.config import Settings
from services.kernel.topics import topic_name
from tests.conftest import OPERATOR, free_port, unique


async def _posting_ids_on_topic(settings: Settings, want: int, timeout: float = 60) -> set[str]:
    consumer = AIOKafkaConsumer(
        topic_name(settings, "wallet.transfers"),
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"check-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    seen: set[str] = set()
    try:
        async def read() -> None:
            while len(seen) < want:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        seen.add(events.unwrap(events.parse(record.value), wallet_pb2.TransfersPosted).posting_id)

        await asyncio.wait_for(read(), timeout)
    finally:
        await consumer.stop()
    return seen


async def test_relay_survives_broker_restart(stack, tmp_path) -> None:
    database = f"{stack.settings.pg_database}_broker"
    admin = await asyncpg.connect(stack.settings.database_url.rsplit("/", 1)[0] + "/postgres")
    await admin.execute(f'CREATE DATABASE "{database}"')
    settings = Settings(
        data_dir=tmp_path, kafka_port=free_port(), kafka_controller_port=free_port(),
        pg_database=database, topic_prefix=stack.settings.topic_prefix,
    )
    broker = Kafka(settings, log=lambda _: None)
    await asyncio.to_thread(broker.start)
    wallet_proc = stack.process(
        "wallet", EARN_PG_DATABASE=database, EARN_KAFKA_PORT=str(settings.kafka_port),
        EARN_KAFKA_CONTROLLER_PORT=str(settings.kafka_controller_port),
    )
    try:
        wallet_proc.start()
        await asyncio.to_thread(wallet_proc.wait_ready, 60)
        async with grpcclient.channel(wallet_proc.address) as channel:
            wallet = wallet_pb2_grpc.WalletServiceStub(channel)

            async def deposits(n: int) -> None:
                for _ in range(n):
                    await wallet.Deposit(
                        wallet_pb2.DepositRequest(idempotency_key=unique(), owner="carol", asset="ETH", amount="0.1"),
                        metadata=OPERATOR,
                    )

            await deposits(20)
            assert len(await _posting_ids_on_topic(settings, 20)) == 20
            await asyncio.to_thread(broker.stop)
            await deposits(30)  # the ledger keeps working; the events wait in the outbox
            await asyncio.to_thread(broker.start)
            assert len(await _posting_ids_on_topic(settings, 50)) == 50
    finally:
        wallet_proc.stop()
        await asyncio.to_thread(broker.stop)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
