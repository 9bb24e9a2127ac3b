"""Group commit: concurrent writes that contend for the same row run as one transaction.

A hot product takes many writes at once, and each of them locks the product's row until
it commits: one at a time, with a transaction, a pool connection and a commit each.
:class:`GroupCommit` gathers the items submitted for the same key while a batch of that
key runs and hands them to ``flush`` together as the next batch: one transaction, the row
locked once. An idle key adds no wait (the first item flushes at once, a batch of one);
under load the batches grow by themselves, up to ``max_items``.

``flush(key, items)`` returns one outcome per item, in order: a result, or the domain
error of that item alone (the others commit). An exception out of ``flush`` fails every
item of the batch (nothing of it committed). Batches of one key run one after another;
different keys run concurrently.

A caller that goes away (its RPC cancelled) does not take its item out of a batch that
has started: the batch commits it, and the client's retry with the same key gets the
stored response, as it would after a crash.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


class GroupCommit(Generic[K, I, R]):
    def __init__(self, flush: Callable[[K, list[I]], Awaitable[Sequence[R | BaseException]]], *, max_items: int = 256) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._flush = flush
        self.max_items = max_items
        self._queues: dict[K, deque[tuple[I, asyncio.Future[R]]]] = {}
        self._runners: set[asyncio.Task[None]] = set()

    async def submit(self, key: K, item: I) -> R:
        """Queue ``item`` under ``key`` and wait for its outcome."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        # Retrieved here so that the outcome of a caller who left is not logged as lost.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            runner = asyncio.create_task(self._run(key, queue), name=f"group-commit:{key}")
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        queue.append((item, future))
        return await asyncio.shield(future)

    async def _run(self, key: K, queue: deque[tuple[I, asyncio.Future[R]]]) -> None:
        try:
            while queue:
                batch = [queue.popleft() for _ in range(min(self.max_items, len(queue)))]
                try:
                    outcomes = await self._flush(key, [item for item, _ in batch])
                    if len(outcomes) != len(batch):
                        raise RuntimeError(f"flush returned {len(outcomes)} outcomes for {len(batch)} items")
                except BaseException as err:  # noqa: BLE001 - every waiter gets it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(err)
                    if isinstance(err, (KeyboardInterrupt, SystemExit)):
                        raise
                    if isinstance(err, asyncio.CancelledError):
                        for _, future in queue:
                            future.cancel()
                        queue.clear()
                        raise
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            # Nothing awaits between the last check of the queue and this removal, so an
            # item submitted meanwhile starts a new runner.
            if self._queues.get(key) is queue:
                del self._queues[key]
