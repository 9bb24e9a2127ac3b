"""Launchpool process: migrate, create topics, serve gRPC, run the outbox relay, the
payout consumer (launchpool.payouts) and the sweeper of committed wallet releases."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from services.kernel import grpcclient
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from google.protobuf.message import DecodeError

from services.kernel import db, deadletters, events, logs, loops, peers, topics
from services.kernel.config import ServiceSettings, load
from services.kernel.errors import InvalidArgument
from services.kernel.grpcserver import GrpcApp
from services.kernel.outbox import Relay
from services.launchpool import metrics, store
from services.launchpool.api import ROLES, SERVICE_NAME, LaunchpoolApi

from earn.v1 import accrual_pb2, launchpool_pb2_grpc

log = logging.getLogger(__name__)

SCHEMA = "launchpool"
MIGRATIONS = Path(__file__).parent / "migrations"
PAYOUT_TOPIC = "launchpool.payouts"
PAYOUT_GROUP = "launchpool-payouts"


class LaunchpoolSettings(ServiceSettings):
    grpc_port: int = 50053
    metrics_port: int = 9103
    wallet_address: str = "127.0.0.1:50051"
    wallet_token: str = "dev-service"
    release_sweep_seconds: float = 5.0
    # PayoutBatch records of one partition applied at once (its last batch waits for them).
    payout_concurrency: int = 4


async def _consume_one(api: LaunchpoolApi, topic: str, record: ConsumerRecord) -> str:
    """Apply one record or park it; raises on a transient failure (retried)."""
    raw = record.value or b""
    where = {"offset": record.offset, "partition": record.partition}
    skipped: list[str] = []
    try:
        outcome = await api.apply_payout(raw, skipped)
    except (DecodeError, ValueError, InvalidArgument) as err:
        error = err.message if isinstance(err, InvalidArgument) else f"{type(err).__name__}: {err}"
        await deadletters.park(api.pool, topic, record.partition, record.offset, error, raw)
        log.error("unreadable launchpool payout batch parked in dead_letters", extra={**where, "error": error})
        return "dead_letter"
    if skipped:
        error = f"{len(skipped)} item(s) not paid: " + "; ".join(skipped)
        await deadletters.park(api.pool, topic, record.partition, record.offset, error, raw)
        log.error("launchpool payout batch paid in part; parked in dead_letters", extra={**where, "error": error[:2000]})
    return outcome


def _is_last_batch(raw: bytes) -> bool:
    try:
        env = events.parse(raw)
        return env.type == accrual_pb2.PayoutBatch.DESCRIPTOR.full_name and accrual_pb2.PayoutBatch.FromString(env.payload).last
    except Exception:  # noqa: BLE001 - applying it will say what it is
        return False


async def _apply_one(api: LaunchpoolApi, topic: str, record: ConsumerRecord) -> None:
    outcome = await loops.retried(
        lambda: _consume_one(api, topic, record), "launchpool payout batch failed; retrying", offset=record.offset, partition=record.partition,
    )
    metrics.PAYOUT_BATCHES.labels(outcome).inc()


async def _apply_partition(api: LaunchpoolApi, topic: str, records: list[ConsumerRecord], concurrency: int) -> None:
    """A partition's records, up to ``concurrency`` at once (batches pay distinct stakes
    under their own keys); a partition's last batch, which completes the partition for
    GetRewardPayoutStatus, only after every record before it is applied."""
    slots = asyncio.Semaphore(max(1, concurrency))
    running: set[asyncio.Task[None]] = set()

    async def guarded(record: ConsumerRecord) -> None:
        async with slots:
            await _apply_one(api, topic, record)

    try:
        for record in records:
            if _is_last_batch(record.value or b"") and running:
                await asyncio.gather(*running)
                running.clear()
            await slots.acquire()
            slots.release()
            task = asyncio.create_task(guarded(record))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)
    finally:
        for task in running:
            task.cancel()


async def consume_payouts(settings: LaunchpoolSettings, api: LaunchpoolApi) -> None:
    """Apply PayoutBatch records, partitions concurrently, each in offset order; offsets
    are committed only after their records are applied (a redelivery is harmless: the
    batch's natural key, the inbox and the wallet's keys)."""
    topic = topics.topic_name(settings, PAYOUT_TOPIC)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=settings.topic_prefix + PAYOUT_GROUP, enable_auto_commit=False,
        auto_offset_reset="earliest", max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024,
    )

    async def apply(fetched: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        await asyncio.gather(*(_apply_partition(api, topic, records, settings.payout_concurrency) for records in fetched.values()))

    await loops.consume(consumer, "payout consumer", [topic], apply, max_records=64)


async def main() -> None:
    settings = load(LaunchpoolSettings)
    logs.configure(settings.log_level)
    await db.migrate(settings, SCHEMA, MIGRATIONS)
    await asyncio.to_thread(topics.ensure_topics, settings, [store.TOPIC, PAYOUT_TOPIC])
    pool = await db.create_pool(settings, SCHEMA)
    channel = grpcclient.channel(settings.wallet_address)
    api = LaunchpoolApi(pool, settings, peers.wallet(channel, settings.wallet_token, retry="retry with the same idempotency_key", not_found=False))
    app = GrpcApp("launchpool", settings, ROLES)
    app.add_servicer(launchpool_pb2_grpc.add_LaunchpoolServiceServicer_to_server, api, SERVICE_NAME)
    if settings.relay_enabled:
        app.background(Relay(settings, pool, SCHEMA).run)
    app.background(lambda: consume_payouts(settings, api))
    app.background(lambda: loops.every(settings.release_sweep_seconds, api.drive_releases, "release sweep failed"))
    app.on_stop(pool.close)
    app.on_stop(lambda: channel.close())
    await app.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
