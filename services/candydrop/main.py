"""CandyDrop process: migrate, create topics, serve gRPC, and count events: one consumer
of exchange.trades, exchange.deposits and simple_earn.accrual. Per fetched partition
batch, one query drops the events of users in no open campaign (most of the exchange's
flow); each remaining event is applied in one transaction with its inbox row. Offsets
are committed only after applying."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from services.kernel import grpcclient
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from google.protobuf.message import DecodeError

from services.candydrop import metrics
from services.candydrop.api import ROLES, SERVICE_NAME, CandyDropApi, Counted, WalletClient
from services.kernel import db, logs, loops, topics
from services.kernel.config import ServiceSettings, load
from services.kernel.errors import InvalidArgument
from services.kernel.grpcserver import GrpcApp

from earn.v1 import candydrop_pb2_grpc

log = logging.getLogger(__name__)

SCHEMA = "candydrop"
MIGRATIONS = Path(__file__).parent / "migrations"
EXCHANGE_TOPICS = ("exchange.trades", "exchange.deposits")
SIMPLE_EARN_TOPIC = "simple_earn.accrual"
GROUP = "candydrop-events"
_STEP_FAILED = "event consumer step failed; retrying"


class CandyDropSettings(ServiceSettings):
    grpc_port: int = 50054
    metrics_port: int = 9104
    wallet_address: str = "127.0.0.1:50051"
    wallet_token: str = "dev-service"
    # Prizes per wallet BulkCredit (at most 10,000).
    credit_chunk: int = 5000
    # Tests only (the kill-and-restart test of the distribution): SIGKILL the process after
    # the wallet paid this many prize chunks, before recording them. 0: never.
    crash_after_chunks: int = 0
    # Distribute a campaign only this many seconds after its end, so that exchange events
    # delivered late still count (the first hourly run after that pays it). 0: at once.
    settle_seconds: float = 0.0


def parse_record(logical: str, record: ConsumerRecord) -> Counted | None:
    """What a record may count; None: nothing (a Simple Earn event that is no subscription).
    Raises DecodeError, ValueError or InvalidArgument for an unreadable record."""
    raw = record.value or b""
    if logical == SIMPLE_EARN_TOPIC:
        return CandyDropApi.parse_simple_earn(raw)
    return CandyDropApi.parse_exchange(raw)


async def apply_batch(api: CandyDropApi, logical: dict[str, str], records: list[ConsumerRecord]) -> None:
    """Apply fetched records in order: unreadable ones parked, then one query finds which
    users take part in an open campaign; only their events get a transaction each (count,
    inbox row, progress). The others count for nothing and write nothing."""
    parsed: list[tuple[ConsumerRecord, Counted | None | str]] = []
    for record in records:
        try:
            parsed.append((record, parse_record(logical[record.topic], record)))
        except (DecodeError, ValueError, InvalidArgument) as err:
            error = err.message if isinstance(err, InvalidArgument) else f"{type(err).__name__}: {err}"
            await loops.retried(lambda r=record, e=error: api.park(r.topic, r.partition, r.offset, e, r.value or b""), _STEP_FAILED, step="park")
            log.error("unreadable event parked in dead_letters", extra={"topic": record.topic, "offset": record.offset, "error": error})
            parsed.append((record, "dead_letter"))
    users = {item.user for _, item in parsed if isinstance(item, Counted)}
    active = await loops.retried(lambda: api.participants(users), _STEP_FAILED, step="participants") if users else set()
    for record, item in parsed:
        if isinstance(item, Counted):
            outcome = await loops.retried(lambda i=item: api.apply(i), _STEP_FAILED, step="apply") if item.user in active else "not_counted"
        else:
            outcome = "ignored" if item is None else item
        metrics.EVENTS.labels(logical[record.topic], outcome).inc()


async def consume(settings: CandyDropSettings, api: CandyDropApi) -> None:
    logical = {topics.topic_name(settings, t): t for t in (*EXCHANGE_TOPICS, SIMPLE_EARN_TOPIC)}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=settings.topic_prefix + GROUP, enable_auto_commit=False,
        auto_offset_reset="earliest",
    )

    async def apply(fetched: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        for records in fetched.values():
            await apply_batch(api, logical, records)

    await loops.consume(consumer, "event consumer", list(logical), apply)


async def main() -> None:
    settings = load(CandyDropSettings)
    logs.configure(settings.log_level)
    await db.migrate(settings, SCHEMA, MIGRATIONS)
    await asyncio.to_thread(topics.ensure_topics, settings, [*EXCHANGE_TOPICS, SIMPLE_EARN_TOPIC])
    pool = await db.create_pool(settings, SCHEMA)
    channel = grpcclient.channel(settings.wallet_address)
    api = CandyDropApi(pool, settings, WalletClient(channel, settings.wallet_token), credit_chunk=settings.credit_chunk,
                       crash_after_chunks=settings.crash_after_chunks, settle_seconds=settings.settle_seconds)
    app = GrpcApp("candydrop", settings, ROLES)
    app.add_servicer(candydrop_pb2_grpc.add_CandyDropServiceServicer_to_server, api, SERVICE_NAME)
    app.background(lambda: consume(settings, api))
    app.on_stop(pool.close)
    app.on_stop(lambda: channel.close())
    await app.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
