"""Market process: migrate, create the prices topic, serve gRPC, consume market.prices.

The consumer stores each record's tick once (inbox by event id, natural key (pair, event
time)), a batch per transaction, and commits offsets only after the batch committed, so
a redelivery is harmless. A record that can never be applied is parked in dead_letters.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from google.protobuf.message import DecodeError

from services.kernel import db, deadletters, logs, loops, topics
from services.kernel.config import ServiceSettings, load
from services.kernel.errors import InvalidArgument
from services.kernel.grpcserver import GrpcApp
from services.market import metrics
from services.market.api import ROLES, SERVICE_NAME, MarketApi, parse_tick_event
from services.market.store import NewTick

from earn.v1 import market_pb2_grpc

log = logging.getLogger(__name__)

SCHEMA = "market"
MIGRATIONS = Path(__file__).parent / "migrations"
TOPIC = "market.prices"
GROUP = "market-prices"


class MarketSettings(ServiceSettings):
    grpc_port: int = 50055
    metrics_port: int = 9105
    # A window is refused when the price in force at any instant is older than this.
    max_gap_seconds: float = 60.0


async def consume_prices(settings: MarketSettings, api: MarketApi) -> None:
    topic = topics.topic_name(settings, TOPIC)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=settings.topic_prefix + GROUP, enable_auto_commit=False,
        auto_offset_reset="earliest",
    )

    async def apply(fetched: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        ticks: list[NewTick] = []
        for records in fetched.values():
            for record in records:
                raw = record.value or b""
                try:
                    ticks.append(parse_tick_event(raw))
                except (DecodeError, ValueError, InvalidArgument) as err:
                    error = err.message if isinstance(err, InvalidArgument) else f"{type(err).__name__}: {err}"
                    await deadletters.park(api.pool, topic, record.partition, record.offset, error, raw)
                    metrics.DEAD_LETTERS.inc()
                    log.error("unreadable price tick parked in dead_letters", extra={"partition": record.partition, "offset": record.offset, "error": error})
        if ticks:
            await loops.retried(lambda: api.apply_ticks(ticks), "storing price ticks failed; retrying")

    await loops.consume(consumer, "prices consumer", [topic], apply, max_records=2000)


async def main() -> None:
    settings = load(MarketSettings)
    logs.configure(settings.log_level)
    await db.migrate(settings, SCHEMA, MIGRATIONS)
    await asyncio.to_thread(topics.ensure_topics, settings, [TOPIC])
    pool = await db.create_pool(settings, SCHEMA)
    api = MarketApi(pool, settings, settings.max_gap_seconds)
    app = GrpcApp("market", settings, ROLES)
    app.add_servicer(market_pb2_grpc.add_MarketServiceServicer_to_server, api, SERVICE_NAME)
    app.background(lambda: consume_prices(settings, api))
    app.on_stop(pool.close)
    await app.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
