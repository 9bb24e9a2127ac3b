"""Transactional outbox and its relay.

A service calls :func:`enqueue` inside the transaction of the change an event
announces, so the event exists if and only if the change committed. The relay reads
the outbox in id order, publishes with an idempotent producer, waits for the broker's
acknowledgement and only then deletes the rows. A crash between the ack and the delete
republishes those rows on restart: delivery is at-least-once, and consumers apply each
event id once (inbox).

Order per key: events of one key come from transactions that serialised on the same
rows, so they get increasing ids; the relay publishes in id order through one producer
and Kafka keeps the order per partition.

Only one relay publishes per schema at a time (a PostgreSQL advisory lock); a second
one waits as a standby. A broker outage is retried with backoff and loses nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from aiokafka import AIOKafkaProducer
from google.protobuf.message import Message
from prometheus_client import Counter, Gauge

from services.kernel import events
from services.kernel.clock import unix_hour
from services.kernel.config import Settings
from services.kernel.errors import FailedPrecondition
from services.kernel.topics import CATALOGUE, topic_name

from earn.v1 import accrual_pb2

log = logging.getLogger(__name__)

PUBLISHED = Counter("earn_outbox_published_total", "Outbox events published to Kafka", ["schema"])
BACKLOG = Gauge("earn_outbox_backlog", "Outbox events waiting to be published", ["schema"])
PUBLISH_ERRORS = Counter("earn_outbox_publish_errors_total", "Failed publish attempts of the relay", ["schema"])


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str  # logical catalogue name
    key: str
    payload: Message
    partition: int | None = None  # None: chosen by the key


def broadcast(topic: str, key: str, payload: Message) -> list[Outgoing]:
    """One event per partition of ``topic``: a fact every partition needs in order with
    its other events (ticks, rate changes). Each copy has its own event id."""
    return [Outgoing(topic, key, payload, p) for p in range(CATALOGUE[topic].partitions)]


_INSERT = "INSERT INTO outbox (event_id, topic, key, partition, envelope) VALUES ($1, $2, $3, $4, $5)"


async def enqueue(
    conn: asyncpg.Connection,
    settings: Settings,
    producer: str,
    occurred_at: datetime,
    items: list[Outgoing],
) -> list[str]:
    """Add events to the outbox inside the caller's transaction; returns their ids."""
    rows = []
    ids = []
    for item in items:
        env = events.wrap(item.payload, key=item.key, producer=producer, occurred_at=occurred_at)
        ids.append(env.event_id)
        rows.append((uuid.UUID(env.event_id), topic_name(settings, item.topic), item.key, item.partition, env.SerializeToString()))
    if len(rows) == 1:  # the usual case: a plain execute costs less than executemany
        await conn.execute(_INSERT, *rows[0])
    elif rows:
        await conn.executemany(_INSERT, rows)
    return ids


async def close_hours(
    conn: asyncpg.Connection,
    settings: Settings,
    producer: str,
    topic: str,
    hour: int,
    at: datetime,
    last_closed: Callable[[asyncpg.Connection], Awaitable[int | None]],
    set_last_closed: Callable[[asyncpg.Connection, int, datetime], Awaitable[None]],
) -> list[int]:
    """The accrual engine's hour watermark (Simple Earn's CloseHour, Launchpool's
    CloseRewardHour): HourClosed to every partition of ``topic`` for every hour after the
    last closed one up to ``hour`` (the first call closes only ``hour``), and ``hour``
    recorded as the last closed. Call inside a transaction holding the service's EXCLUSIVE
    watermark lock, ``at`` read after taking it: every accrual write committed before is
    before the ticks in every partition. Returns the hours closed: none when ``hour`` is
    closed already (idempotent); FAILED_PRECONDITION while hour ``hour - 1`` has not ended."""
    if hour > unix_hour(at):
        raise FailedPrecondition(f"hour: {hour} would close hour {hour - 1}, which has not ended yet")
    last = await last_closed(conn)
    if last is not None and hour <= last:
        return []
    hours = [hour] if last is None else list(range(last + 1, hour + 1))
    await enqueue(conn, settings, producer, at, [o for h in hours for o in broadcast(topic, f"hour:{h}", accrual_pb2.HourClosed(hour=h))])
    await set_last_closed(conn, hour, at)
    return hours


class Relay:
    """Publishes one schema's outbox to Kafka. ``run()`` until ``stop()``."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, schema: str, *, batch_size: int = 500) -> None:
        self.settings = settings
        self.pool = pool
        self.schema = schema
        self.batch_size = batch_size
        self.poll_seconds = 0.5
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._lock_key = int.from_bytes(hashlib.sha256(f"relay:{schema}".encode()).digest()[:8], "big", signed=True)
        # The counters exist from the start, at 0, so rates and alerts see a relay that
        # never failed rather than no data.
        PUBLISHED.labels(schema)
        PUBLISH_ERRORS.labels(schema)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Become the schema's publisher (waiting as standby if another is), then publish."""
        channel = f"{self.schema}_outbox"

        def wake(*_: object) -> None:
            self._wake.set()

        conn: asyncpg.Connection = await self.pool.acquire()
        try:
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._lock_key):
                if await self._sleep(1.0):
                    return
            await conn.add_listener(channel, wake)
            log.info("relay publishing", extra={"schema": self.schema})
            while not self._stopping.is_set():
                producer = await self._start_producer()
                if producer is None:
                    return
                try:
                    await self._publish_until_stopped(producer)
                except Exception:  # broker gone mid-send, connection reset...: retry with a new producer
                    PUBLISH_ERRORS.labels(self.schema).inc()
                    log.exception("relay publish failed; retrying", extra={"schema": self.schema})
                    await self._sleep(1.0)
                finally:
                    await producer.stop()
        finally:
            try:
                await conn.remove_listener(channel, wake)
                await conn.execute("SELECT pg_advisory_unlock_all()")
            finally:
                await self.pool.release(conn)

    async def _start_producer(self) -> AIOKafkaProducer | None:
        delay = 0.2
        while not self._stopping.is_set():
            producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.kafka_bootstrap,
                client_id=f"relay-{self.schema}",
                enable_idempotence=True,
                acks="all",
                linger_ms=2,
                max_request_size=8 * 1024 * 1024,
                request_timeout_ms=15000,
            )
            try:
                await producer.start()
                return producer
            except Exception as exc:
                await producer.stop()
                log.warning("relay cannot reach Kafka; retrying", extra={"schema": self.schema, "error": str(exc)})
                # While Kafka is away the backlog grows: keep the gauge (and the alert on it) true.
                PUBLISH_ERRORS.labels(self.schema).inc()
                await self._refresh_backlog()
                if await self._sleep(delay):
                    return None
                delay = min(delay * 2, 5.0)
        return None

    async def _publish_until_stopped(self, producer: AIOKafkaProducer) -> None:
        while not self._stopping.is_set():
            published = await self.publish_once(producer)
            if published < self.batch_size:
                self._wake.clear()
                await self._sleep(self.poll_seconds, wake=True)

    async def publish_once(self, producer: AIOKafkaProducer) -> int:
        """Publish the oldest batch; returns how many events went out."""
        rows = await self.pool.fetch(
            "SELECT id, topic, key, partition, envelope FROM outbox ORDER BY id LIMIT $1", self.batch_size
        )
        if rows:
            futures = [
                await producer.send(r["topic"], value=bytes(r["envelope"]), key=r["key"].encode(), partition=r["partition"])
                for r in rows
            ]
            await asyncio.gather(*futures)
            await self.pool.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows])
            PUBLISHED.labels(self.schema).inc(len(rows))
        BACKLOG.labels(self.schema).set(await self.pool.fetchval("SELECT count(*) FROM outbox"))
        return len(rows)

    async def _refresh_backlog(self) -> None:
        try:
            BACKLOG.labels(self.schema).set(await self.pool.fetchval("SELECT count(*) FROM outbox"))
        except Exception:  # noqa: BLE001 - the database may be away too; a metric never stops the relay
            log.debug("outbox backlog not measured", exc_info=True)

    async def _sleep(self, seconds: float, *, wake: bool = False) -> bool:
        """Sleep up to ``seconds`` (less if woken); True when stopping."""
        waiter = self._wake if wake else self._stopping
        try:
            await asyncio.wait_for(waiter.wait(), seconds)
        except TimeoutError:
            pass
        return self._stopping.is_set()


class RelaySettings(Settings):
    relay_schema: str = ""


async def run_standalone() -> None:
    """Run a relay on its own: ``EARN_RELAY_SCHEMA=wallet python -m services.kernel.outbox``."""
    import signal

    from services.kernel import db, logs
    from services.kernel.config import load

    settings = load(RelaySettings)
    logs.configure(settings.log_level)
    if not settings.relay_schema:
        raise SystemExit("set EARN_RELAY_SCHEMA to the schema whose outbox to publish")
    pool = await db.create_pool(settings, settings.relay_schema, min_size=1, max_size=2)
    relay = Relay(settings, pool, settings.relay_schema)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop)
    try:
        await relay.run()
    finally:
        await pool.close()


if __name__ == "__main__":
    asyncio.run(run_standalone())
