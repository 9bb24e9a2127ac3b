"""Simple Earn process: migrate, create topics, serve gRPC, run the outbox relay, the
payout consumer (accrual.payouts), the sweeper of committed wallet releases and the
refresh of the open-positions gauge."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from pathlib import Path

from services.kernel import grpcclient
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from google.protobuf.message import DecodeError

from services.kernel import db, deadletters, events, logs, loops, peers, topics
from services.kernel.config import ServiceSettings, load
from services.kernel.errors import InvalidArgument
from services.kernel.grpcserver import GrpcApp
from services.kernel.outbox import Relay
from services.simple_earn import metrics, store
from services.simple_earn.api import ROLES, SERVICE_NAME, SimpleEarnApi

from earn.v1 import accrual_pb2, simple_earn_pb2_grpc

log = logging.getLogger(__name__)

SCHEMA = "simple_earn"
MIGRATIONS = Path(__file__).parent / "migrations"
PAYOUT_TOPIC = "accrual.payouts"
PAYOUT_GROUP = "simple_earn-payouts"
# Records fetched at once, and queued per partition before its fetching pauses.
PAYOUT_FETCH_RECORDS = 64
PAYOUT_QUEUE_PER_PARTITION = 16


class SimpleEarnSettings(ServiceSettings):
    grpc_port: int = 50052
    metrics_port: int = 9102
    wallet_address: str = "127.0.0.1:50051"
    wallet_token: str = "dev-service"
    release_sweep_seconds: float = 5.0
    positions_gauge_seconds: float = 15.0
    # PayoutBatch records of one partition applied at once (a partition's last batch waits
    # for those before it).
    payout_concurrency: int = 4


def _is_last_batch(raw: bytes) -> bool:
    """Whether a record is a partition's last PayoutBatch (False for anything unreadable:
    applying it will say what it is)."""
    try:
        env = events.parse(raw)
        return env.type == accrual_pb2.PayoutBatch.DESCRIPTOR.full_name and accrual_pb2.PayoutBatch.FromString(env.payload).last
    except Exception:
        return False


class _PartitionWorker:
    """Applies one partition's records, up to ``concurrency`` at once, started in offset
    order. Batches are independent (each pays its own positions, under its own keys), but
    a partition's last batch marks the partition done, so it starts only after every
    record before it has been applied. ``done`` is the offset to commit: every record
    before it has been applied."""

    def __init__(self, api: SimpleEarnApi, topic: str, tp: TopicPartition, concurrency: int) -> None:
        self.queue: asyncio.Queue[ConsumerRecord] = asyncio.Queue()
        self.done: int | None = None
        self.committed: int | None = None
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._started: collections.deque[int] = collections.deque()
        self._applied: set[int] = set()
        self.task = asyncio.create_task(self._run(api, topic), name=f"payouts-{tp.partition}")

    async def _run(self, api: SimpleEarnApi, topic: str) -> None:
        while True:
            record = await self.queue.get()
            if _is_last_batch(record.value or b"") and self._inflight:
                await asyncio.wait(list(self._inflight.values()))
            await self._slots.acquire()
            self._started.append(record.offset)
            task = asyncio.create_task(self._apply(api, topic, record))
            self._inflight[record.offset] = task
            task.add_done_callback(lambda t, offset=record.offset: self._finished(offset, t))

    def _finished(self, offset: int, task: asyncio.Task[None]) -> None:
        self._slots.release()
        self._inflight.pop(offset, None)
        if task.cancelled():
            return  # not applied (the worker stopped): never counted as done
        self._applied.add(offset)
        while self._started and self._started[0] in self._applied:
            first = self._started.popleft()
            self._applied.discard(first)
            self.done = first + 1

    @staticmethod
    async def _apply(api: SimpleEarnApi, topic: str, record: ConsumerRecord) -> None:
        delay = 0.5
        while True:
            started = time.perf_counter()
            try:
                outcome = await _consume_one(api, topic, record)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("payout batch failed; retrying", extra={"offset": record.offset, "partition": record.partition})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            metrics.PAYOUT_BATCHES.labels(outcome).inc()
            metrics.PAYOUT_BATCH_SECONDS.observe(time.perf_counter() - started)
            return

    async def stop(self) -> None:
        self.task.cancel()
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(self.task, *self._inflight.values(), return_exceptions=True)


class _Workers(ConsumerRebalanceListener):
    """One worker per assigned partition; a revoked partition's worker is stopped (what it
    was doing is idempotent and the next owner redoes it) and its progress committed."""

    def __init__(self, api: SimpleEarnApi, topic: str, concurrency: int) -> None:
        self.api = api
        self.topic = topic
        self.concurrency = concurrency
        self.consumer: AIOKafkaConsumer | None = None
        self.by_partition: dict[TopicPartition, _PartitionWorker] = {}

    def get(self, tp: TopicPartition) -> _PartitionWorker:
        worker = self.by_partition.get(tp)
        if worker is None:
            worker = self.by_partition[tp] = _PartitionWorker(self.api, self.topic, tp, self.concurrency)
        return worker

    async def commit(self, partitions: list[TopicPartition] | None = None) -> None:
        offsets = {
            tp: w.done for tp, w in self.by_partition.items()
            if (partitions is None or tp in partitions) and w.done is not None and w.done != w.committed
        }
        if offsets and self.consumer is not None:
            await self.consumer.commit(offsets)
            for tp, offset in offsets.items():
                self.by_partition[tp].committed = offset

    async def stop(self, partitions: list[TopicPartition] | None = None) -> None:
        for tp in list(self.by_partition):
            if partitions is None or tp in partitions:
                await self.by_partition[tp].stop()
        try:
            await self.commit(partitions)
        except Exception:  # the group moved on: the next owner redoes (idempotently) what is not committed
            log.warning("payout offsets not committed on revocation", exc_info=True)
        for tp in list(self.by_partition):
            if partitions is None or tp in partitions:
                del self.by_partition[tp]

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.stop(list(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        pass


async def consume_payouts(settings: SimpleEarnSettings, api: SimpleEarnApi) -> None:
    """Apply PayoutBatch events; commit offsets only after they are applied.

    The partitions are applied concurrently, each by its own worker, which also applies a
    few of its partition's batches at once (the engine sends a partition's batches in a
    burst); a partition's last batch is applied after every record before it. The fetch
    loop hands records to the workers, pauses a partition whose worker is behind and
    commits each partition's progress up to its first record not yet applied. A transient failure (wallet or database down) retries the
    same record with backoff, never skipping it. A record that cannot be parsed or
    applied (not a PayoutBatch, a bad job or period) is parked in ``dead_letters`` with its
    raw bytes and the error before the consumer moves past it: the row is committed
    before the offset is (Kafka's offset commit cannot join a PostgreSQL transaction), and
    parking is idempotent per (topic, partition, offset), so a crash in between parks it
    once and loses nothing. A batch paid with some items left out (unknown position,
    another user's, bad amount) is parked too, for a look: its other items are paid.
    """
    topic = topics.topic_name(settings, PAYOUT_TOPIC)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.topic_prefix + PAYOUT_GROUP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
    )
    workers = _Workers(api, topic, settings.payout_concurrency)
    workers.consumer = consumer
    await loops.start_consumer(consumer, "payout consumer")
    consumer.subscribe([topic], listener=workers)
    try:
        while True:
            fetched = await consumer.getmany(timeout_ms=200, max_records=PAYOUT_FETCH_RECORDS)
            for tp, records in fetched.items():
                worker = workers.get(tp)
                for record in records:
                    worker.queue.put_nowait(record)
                if worker.queue.qsize() >= PAYOUT_QUEUE_PER_PARTITION:
                    consumer.pause(tp)
            paused = consumer.paused()
            for tp, worker in workers.by_partition.items():
                if worker.task.done() and not worker.task.cancelled():
                    worker.task.result()  # a worker never ends by itself: surface its error
                if tp in paused and worker.queue.qsize() < PAYOUT_QUEUE_PER_PARTITION // 2:
                    consumer.resume(tp)
            try:
                await workers.commit()
            except Exception:  # a rebalance in progress: committed after it, or redone by the next owner
                log.warning("payout offsets not committed; will retry", exc_info=True)
    finally:
        await workers.stop()
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
        if await deadletters.park(api.pool, topic, record.partition, record.offset, error, raw):
            metrics.DEAD_LETTERS.labels("unreadable").inc()
        log.error("unreadable payout batch parked in dead_letters", extra={**where, "error": error})
        return "dead_letter"
    if skipped:
        error = f"{len(skipped)} item(s) not paid: " + "; ".join(skipped)
        if await deadletters.park(api.pool, topic, record.partition, record.offset, error, raw):
            metrics.DEAD_LETTERS.labels("items_skipped").inc()
        log.error("payout batch paid in part; parked in dead_letters", extra={**where, "error": error})
    log.info("payout batch", extra={**where, "outcome": outcome})
    return outcome


async def refresh_positions_gauge(settings: SimpleEarnSettings, api: SimpleEarnApi) -> None:
    """earn_simple_earn_positions_open from the products' open_positions column (one
    small read, kept by the writes that open and close positions)."""

    async def refresh() -> None:
        metrics.set_open_positions(await store.open_positions(api.pool))

    await loops.every(settings.positions_gauge_seconds, refresh, "open positions gauge refresh failed")


async def sweep_releases(settings: SimpleEarnSettings, api: SimpleEarnApi) -> None:
    """Finish wallet releases committed before a crash or a wallet outage."""
    await loops.every(settings.release_sweep_seconds, api.drive_releases, "release sweep failed")


async def main() -> None:
    settings = load(SimpleEarnSettings)
    logs.configure(settings.log_level)
    await db.migrate(settings, SCHEMA, MIGRATIONS)
    await asyncio.to_thread(topics.ensure_topics, settings, ["simple_earn.accrual", PAYOUT_TOPIC])
    pool = await db.create_pool(settings, SCHEMA)
    channel = grpcclient.channel(settings.wallet_address)
    api = SimpleEarnApi(pool, settings, peers.wallet(channel, settings.wallet_token, retry="retry with the same idempotency_key", not_found=False))
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
