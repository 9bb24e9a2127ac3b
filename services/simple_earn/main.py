"""Simple Earn process: migrate, create topics, serve gRPC, run the outbox relay, the
payout consumer (accrual.payouts), the sweeper of committed wallet releases and the
refresh of the open-positions gauge."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from google.protobuf.message import DecodeError

from services.kernel import db, logs, topics
from services.kernel.config import ServiceSettings, load
from services.kernel.errors import InvalidArgument
from services.kernel.grpcserver import GrpcApp
from services.kernel.outbox import Relay
from services.simple_earn import metrics, store
from services.simple_earn.api import ROLES, SERVICE_NAME, SimpleEarnApi, WalletClient

from earn.v1 import simple_earn_pb2_grpc

log = logging.getLogger(__name__)

SCHEMA = "simple_earn"
MIGRATIONS = Path(__file__).parent / "migrations"
PAYOUT_TOPIC = "accrual.payouts"
PAYOUT_GROUP = "simple_earn-payouts"


class SimpleEarnSettings(ServiceSettings):
    grpc_port: int = 50052
    metrics_port: int = 9102
    wallet_address: str = "127.0.0.1:50051"
    wallet_token: str = "dev-service"
    release_sweep_seconds: float = 5.0
    positions_gauge_seconds: float = 15.0


async def consume_payouts(settings: SimpleEarnSettings, api: SimpleEarnApi) -> None:
    """Apply PayoutBatch events one by one; commit offsets only after they are applied.

    A transient failure (wallet or database down) retries the same record with backoff,
    never skipping it. A record that cannot be parsed or applied (not a PayoutBatch, a
    bad job or period) is parked in ``dead_letters`` with its raw bytes and the error
    before the consumer moves past it: the row is committed before the offset is (Kafka's
    offset commit cannot join a PostgreSQL transaction), and parking is idempotent per
    (topic, partition, offset), so a crash in between parks it once and loses nothing.
    A batch paid with some items left out (unknown position, bad amount) is parked too,
    for a look: its other items are paid.
    """
    topic = topics.topic_name(settings, PAYOUT_TOPIC)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.topic_prefix + PAYOUT_GROUP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    delay = 0.5
    while True:
        try:
            await consumer.start()
            break
        except Exception as exc:
            log.warning("payout consumer cannot reach Kafka; retrying", extra={"error": str(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=1000, max_records=50)
            for records in batches.values():
                for record in records:
                    delay = 0.5
                    while True:
                        try:
                            outcome = await _consume_one(api, topic, record)
                            metrics.PAYOUT_BATCHES.labels(outcome).inc()
                            break
                        except asyncio.CancelledError:
                            raise
                        except Exception:
                            log.exception("payout batch failed; retrying", extra={"offset": record.offset, "partition": record.partition})
                            await asyncio.sleep(delay)
                            delay = min(delay * 2, 10.0)
            if batches:
                await consumer.commit()
    finally:
        await consumer.stop()


async def _consume_one(api: SimpleEarnApi, topic: str, record: ConsumerRecord) -> str:
    """Apply one record, or park it: "paid", "duplicate" or "dead_letter". Raises on a
    transient failure (the caller retries the same record)."""
    raw = record.value or b""
    where = {"offset": record.offset, "partition": record.partition}
    skipped: list[str] = []
    try:
        outcome = await api.apply_payout(raw, skipped)
    except (DecodeError, ValueError, InvalidArgument) as err:
        error = err.message if isinstance(err, InvalidArgument) else f"{type(err).__name__}: {err}"
        if await store.park_dead_letter(api.pool, topic, record.partition, record.offset, error, raw):
            metrics.DEAD_LETTERS.labels("unreadable").inc()
        log.error("unreadable payout batch parked in dead_letters", extra={**where, "error": error})
        return "dead_letter"
    if skipped:
        error = f"{len(skipped)} item(s) not paid: " + "; ".join(skipped)
        if await store.park_dead_letter(api.pool, topic, record.partition, record.offset, error, raw):
            metrics.DEAD_LETTERS.labels("items_skipped").inc()
        log.error("payout batch paid in part; parked in dead_letters", extra={**where, "error": error})
    log.info("payout batch", extra={**where, "outcome": outcome})
    return outcome


async def refresh_positions_gauge(settings: SimpleEarnSettings, api: SimpleEarnApi) -> None:
    """earn_simple_earn_positions_open from the products' open_positions column (one
    small read, kept by the writes that open and close positions)."""
    while True:
        try:
            metrics.set_open_positions(await store.open_positions(api.pool))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("open positions gauge refresh failed")
        await asyncio.sleep(settings.positions_gauge_seconds)


async def sweep_releases(settings: SimpleEarnSettings, api: SimpleEarnApi) -> None:
    """Finish wallet releases committed before a crash or a wallet outage."""
    while True:
        try:
            await api.drive_releases()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("release sweep failed")
        await asyncio.sleep(settings.release_sweep_seconds)


async def main() -> None:
    settings = load(SimpleEarnSettings)
    logs.configure(settings.log_level)
    await db.migrate(settings, SCHEMA, MIGRATIONS)
    await asyncio.to_thread(topics.ensure_topics, settings, ["simple_earn.accrual", PAYOUT_TOPIC])
    pool = await db.create_pool(settings, SCHEMA)
    channel = grpc.aio.insecure_channel(settings.wallet_address)
    api = SimpleEarnApi(pool, settings, WalletClient(channel, settings.wallet_token))
    app = GrpcApp("simple_earn", settings, ROLES)
    app.add_servicer(simple_earn_pb2_grpc.add_SimpleEarnServiceServicer_to_server, api, SERVICE_NAME)
    if settings.relay_enabled:
        app.background(Relay(settings, pool, SCHEMA).run)
    app.background(lambda: consume_payouts(settings, api))
    app.background(lambda: sweep_releases(settings, api))
    app.background(lambda: refresh_positions_gauge(settings, api))
    app.on_stop(pool.close)
    app.on_stop(lambda: channel.close())
    await app.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
