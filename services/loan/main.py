"""Crypto Loan process: migrate, create its topics, serve gRPC, run the outbox relay
(loan states for the engine), the consumer of the engine's actions (loan.actions:
margin calls recorded, liquidations executed; an unreadable record parked in
dead_letters) and the sweep of pending operations."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from services.kernel import grpcclient
from aiokafka import AIOKafkaConsumer, ConsumerRecord

from services.kernel import db, deadletters, logs, loops, topics
from services.kernel.config import load
from services.kernel.grpcserver import GrpcApp
from services.kernel.outbox import Relay
from services.kernel.topics import topic_name
from services.loan import metrics
from services.loan.api import ACTION_TOPIC, ROLES, SERVICE_NAME, STATE_TOPIC, LoanApi, LoanSettings, market_client, wallet_client

from earn.v1 import loan_pb2_grpc

log = logging.getLogger(__name__)

SCHEMA = "loan"
MIGRATIONS = Path(__file__).parent / "migrations"
ACTION_GROUP = "loan-actions"


async def consume_actions(settings: LoanSettings, api: LoanApi) -> None:
    """The engine's actions, at least once; each applied idempotently (the loan, kind and
    version; a liquidation once per loan), offsets committed after."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=settings.topic_prefix + ACTION_GROUP, enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    while True:
        try:
            await consumer.start()
            break
        except Exception as exc:  # noqa: BLE001
            log.warning("action consumer cannot reach Kafka; retrying", extra={"error": str(exc)})
            await asyncio.sleep(1.0)
    topic = topic_name(settings, ACTION_TOPIC)
    consumer.subscribe([topic])
    try:
        while True:
            fetched = await consumer.getmany(timeout_ms=200, max_records=500)
            for tp, records in fetched.items():
                for record in records:
                    while True:
                        try:
                            await api.apply_action(record.value or b"")
                            break
                        except (ValueError, TypeError) as err:
                            await park(api, topic, record, f"{type(err).__name__}: {err}")
                            break
                        except asyncio.CancelledError:
                            raise
                        except Exception:  # noqa: BLE001 - the wallet or the database: retry the same record
                            log.exception("applying a loan action failed; retrying", extra={"offset": record.offset})
                            await asyncio.sleep(1.0)
                await consumer.commit({tp: records[-1].offset + 1})
    finally:
        await consumer.stop()


async def park(api: LoanApi, topic: str, record: ConsumerRecord, error: str) -> None:
    """An unreadable record of loan.actions: parked in dead_letters (once per record; a
    redelivery after a restart parks nothing twice), counted, logged; the consumer goes on."""
    where = {"partition": record.partition, "offset": record.offset}
    raw = record.value or b""
    if await loops.retried(lambda: deadletters.park(api.pool, topic, record.partition, record.offset, error, raw),
                           "parking a loan action failed; retrying", **where):
        metrics.DEAD_LETTERS.inc()
    log.error("unreadable loan action parked in dead_letters", extra={**where, "error": error})


async def sweep(settings: LoanSettings, api: LoanApi) -> None:
    while True:
        try:
            await api.sweep()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("loan sweep failed")
        await asyncio.sleep(settings.sweep_seconds)


async def main() -> None:
    settings = load(LoanSettings)
    logs.configure(settings.log_level)
    await db.migrate(settings, SCHEMA, MIGRATIONS)
    await asyncio.to_thread(topics.ensure_topics, settings, [STATE_TOPIC, ACTION_TOPIC])
    pool = await db.create_pool(settings, SCHEMA)
    wallet = grpcclient.channel(settings.wallet_address)
    market = grpcclient.channel(settings.market_address)
    api = LoanApi(pool, settings, wallet_client(wallet, settings.service_token), market_client(market, settings.service_token))
    app = GrpcApp("loan", settings, ROLES)
    app.add_servicer(loan_pb2_grpc.add_LoanServiceServicer_to_server, api, SERVICE_NAME)
    if settings.relay_enabled:
        app.background(Relay(settings, pool, SCHEMA).run)
    app.background(lambda: consume_actions(settings, api))
    app.background(lambda: sweep(settings, api))
    app.on_stop(pool.close)
    app.on_stop(lambda: wallet.close())
    app.on_stop(lambda: market.close())
    await app.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
