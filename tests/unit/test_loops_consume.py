"""The kernel's consumer loop (services.kernel.loops.consume) of CandyDrop, HODLer,
Launchpool and the market: a fetch is applied before its offsets are committed, an empty
fetch commits nothing, a failed commit (a rebalance) does not stop the loop, and the
consumer is stopped however the loop ends."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from services.kernel import loops


class FakeConsumer:
    def __init__(self, fetches: list[dict[TopicPartition, list[Any]]], failing_commits: int = 0) -> None:
        self.fetches = fetches
        self.failing_commits = failing_commits
        self.log: list[tuple[str, Any]] = []

    async def start(self) -> None:
        self.log.append(("start", None))

    def subscribe(self, topics: list[str]) -> None:
        self.log.append(("subscribe", topics))

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        if not self.fetches:
            raise asyncio.CancelledError
        return self.fetches.pop(0)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.failing_commits:
            self.failing_commits -= 1
            raise RuntimeError("rebalance in progress")
        self.log.append(("commit", offsets))

    async def stop(self) -> None:
        self.log.append(("stop", None))


def _records(partition: int, *offsets: int) -> list[Any]:
    return [SimpleNamespace(topic="t", partition=partition, offset=o) for o in offsets]


def test_applied_then_committed_and_stopped() -> None:
    p0, p1 = TopicPartition("t", 0), TopicPartition("t", 1)
    consumer = FakeConsumer([{p0: _records(0, 5, 6), p1: _records(1, 9)}, {}, {p0: _records(0, 7)}], failing_commits=1)

    async def apply(fetched: dict[TopicPartition, list[Any]]) -> None:
        consumer.log.append(("apply", {tp.partition: [r.offset for r in rs] for tp, rs in fetched.items()}))

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(loops.consume(consumer, "test consumer", ["t"], apply))  # type: ignore[arg-type]
    assert consumer.log == [
        ("start", None), ("subscribe", ["t"]),
        ("apply", {0: [5, 6], 1: [9]}),  # its commit failed: logged, the loop goes on
        ("apply", {0: [7]}), ("commit", {p0: 8}),
        ("stop", None),
    ]
