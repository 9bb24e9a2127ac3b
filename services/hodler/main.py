"""HODLer Airdrop process: migrate, create topics, serve gRPC, and follow the wallet:
one consumer of wallet.transfers (its own group) applies each posting's changes of
counted holdings in one transaction with its inbox row, then records the partition's
next offset (the distribution compares it with the topic's end offsets). Kafka offsets
are committed only after applying."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from google.protobuf.message import DecodeError

from services.hodler import metrics
from services.hodler.api import ROLES, SERVICE_NAME, WALLET_TOPIC, HodlerApi, WalletClient
from services.kernel import db, grpcclient, logs, loops, topics
from services.kernel.config import ServiceSettings, load
from services.kernel.errors import InvalidArgument
from services.kernel.grpcserver import GrpcApp

from earn.v1 import hodler_pb2_grpc

log = logging.getLogger(__name__)

SCHEMA = "hodler"
MIGRATIONS = Path(__file__).parent / "migrations"
GROUP = "hodler-wallet"
_STEP_FAILED = "wallet event consumer step failed; retrying"


class HodlerSettings(ServiceSettings):
    grpc_port: int = 50059
    metrics_port: int = 9112
    wallet_address: str = "127.0.0.1:50051"
    wallet_token: str = "dev-service"
    # Rewards per wallet BulkCredit (at most 10,000).
    credit_chunk: int = 5000
    # Tests only (the kill-and-restart test of the distribution): SIGKILL the process after
    # the wallet paid this many reward chunks, before recording them. 0: never.
    crash_after_chunks: int = 0
    # An airdrop is distributed only this long after its window closed, so that wallet
    # postings stamped before the end have left the wallet's outbox and reached the topic
    # (the relay publishes within seconds; this covers a relay restart). With the hourly
    # job, an airdrop is paid by the first run at least this long after its end.
    settle_seconds: float = 600.0
    # How often the airdrops-by-status gauge is refreshed.
    gauge_seconds: float = 15.0


class TopicEnds:
    """The end offsets of wallet.transfers' partitions, read by a consumer of no group."""

    def __init__(self, settings: HodlerSettings) -> None:
        self.settings = settings
        self.topic = topics.topic_name(settings, WALLET_TOPIC)
        self._consumer: AIOKafkaConsumer | None = None

    async def __call__(self) -> dict[int, int]:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False, group_id=None)
            await consumer.start()
            self._consumer = consumer
        partitions = range(topics.CATALOGUE[WALLET_TOPIC].partitions)
        ends = await self._consumer.end_offsets([TopicPartition(self.topic, p) for p in partitions])
        return {tp.partition: offset for tp, offset in ends.items()}

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()


async def apply_batch(api: HodlerApi, records: list[ConsumerRecord]) -> None:
    """Apply one partition's fetched records in order, then record the next offset."""
    for record in records:
        try:
            parsed = api.parse_posting(record.value or b"")
        except (DecodeError, ValueError, InvalidArgument) as err:
            error = err.message if isinstance(err, InvalidArgument) else f"{type(err).__name__}: {err}"
            await loops.retried(lambda r=record, e=error: api.park(r.topic, r.partition, r.offset, e, r.value or b""), _STEP_FAILED, step="park")
            log.error("unreadable wallet event parked in dead_letters", extra={"topic": record.topic, "offset": record.offset, "error": error})
            metrics.EVENTS.labels("dead_letter").inc()
            continue
        outcome = "ignored" if parsed is None else await loops.retried(lambda p=parsed: api.apply(p), _STEP_FAILED, step="apply")
        metrics.EVENTS.labels(outcome).inc()
    if records:
        last = records[-1]
        await loops.retried(lambda: api.advance({last.partition: last.offset + 1}), _STEP_FAILED, step="advance")


async def consume(settings: HodlerSettings, api: HodlerApi) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=settings.topic_prefix + GROUP, enable_auto_commit=False,
        auto_offset_reset="earliest",
    )

    async def apply(fetched: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        for records in fetched.values():
            await apply_batch(api, records)

    await loops.consume(consumer, "wallet event consumer", [topics.topic_name(settings, WALLET_TOPIC)], apply)


async def main() -> None:
    settings = load(HodlerSettings)
    logs.configure(settings.log_level)
    await db.migrate(settings, SCHEMA, MIGRATIONS)
    await asyncio.to_thread(topics.ensure_topics, settings, [WALLET_TOPIC])
    pool = await db.create_pool(settings, SCHEMA)
    channel = grpcclient.channel(settings.wallet_address)
    ends = TopicEnds(settings)
    api = HodlerApi(pool, settings, WalletClient(channel, settings.wallet_token), ends, credit_chunk=settings.credit_chunk,
                    crash_after_chunks=settings.crash_after_chunks, settle_seconds=settings.settle_seconds)
    app = GrpcApp("hodler", settings, ROLES)
    app.add_servicer(hodler_pb2_grpc.add_HodlerServiceServicer_to_server, api, SERVICE_NAME)
    app.background(lambda: consume(settings, api))
    app.background(lambda: loops.every(settings.gauge_seconds, api.refresh_gauges, "airdrop gauge refresh failed"))
    app.on_stop(pool.close)
    app.on_stop(ends.close)
    app.on_stop(lambda: channel.close())
    await app.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
