"""The loops of a service's background tasks: retry until done, repeat forever, start a
Kafka consumer while the broker is not there yet.

Each loop lets ``asyncio.CancelledError`` through (the shutdown cancels background
tasks) and logs every other failure before it tries again: work is retried, never
skipped; a periodic job's failure waits for its next round.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY = 0.5
MAX_RETRY_DELAY = 10.0
MAX_START_DELAY = 5.0


async def retried(work: Callable[[], Awaitable[T]], message: str, **extra: Any) -> T:
    """``work()`` until it succeeds, waiting 0.5 s doubling to 10 s between tries; each
    failure is logged as ``message`` with ``extra``."""
    delay = FIRST_DELAY
    while True:
        try:
            return await work()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(message, extra=extra)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)


async def every(seconds: float, job: Callable[[], Awaitable[object]], message: str) -> None:
    """``job()``, then ``seconds`` of sleep, forever; a failure is logged as ``message``."""
    while True:
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(message)
        await asyncio.sleep(seconds)


async def start_consumer(consumer: AIOKafkaConsumer, name: str) -> None:
    """Start ``consumer``, retrying (0.5 s doubling to 5 s) while Kafka cannot be reached;
    ``name`` says which consumer in the warning."""
    delay = FIRST_DELAY
    while True:
        try:
            await consumer.start()
            return
        except Exception as exc:
            log.warning(f"{name} cannot reach Kafka; retrying", extra={"error": str(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_START_DELAY)


async def consume(
    consumer: AIOKafkaConsumer,
    name: str,
    topics: list[str],
    apply: Callable[[dict[TopicPartition, list[ConsumerRecord]]], Awaitable[object]],
    *,
    max_records: int = 500,
) -> None:
    """A consumer's life: start it (:func:`start_consumer`), subscribe it to ``topics``,
    then forever fetch up to ``max_records``, ``apply`` them (each partition's records in
    offset order) and only then commit each partition's next offset, so a crash redelivers
    what was not applied for sure (consumers apply idempotently: inbox, natural keys). A
    failed commit (a rebalance) is logged: the next owner redoes what is not committed."""
    await start_consumer(consumer, name)
    consumer.subscribe(topics)
    try:
        while True:
            fetched = await consumer.getmany(timeout_ms=200, max_records=max_records)
            if not fetched:
                continue
            await apply(fetched)
            offsets = {TopicPartition(tp.topic, tp.partition): records[-1].offset + 1 for tp, records in fetched.items() if records}
            try:
                await consumer.commit(offsets)
            except Exception:
                log.warning(f"{name}: offsets not committed", exc_info=True)
    finally:
        await consumer.stop()
