"""Group commit (services.kernel.groupcommit): batches per key, one outcome per item."""

import asyncio

import pytest

from services.kernel.errors import FailedPrecondition
from services.kernel.groupcommit import GroupCommit


class Recorder:
    """A flush that records its batches and holds each one until released."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def flush(self, key: str, items: list[int]) -> list[object]:
        self.batches.append((key, list(items)))
        await self.gate.wait()
        return [FailedPrecondition(f"odd {i}") if i % 2 else i * 10 for i in items]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_idle_key_flushes_at_once_and_a_busy_key_gathers_the_next_batch() -> None:
    recorder = Recorder()
    commits = GroupCommit(recorder.flush, max_items=3)
    assert await commits.submit("a", 2) == 20
    recorder.gate.clear()
    first = asyncio.ensure_future(commits.submit("a", 4))
    await settle()
    waiting = [asyncio.ensure_future(commits.submit("a", i)) for i in (6, 8, 10, 12)]
    other = asyncio.ensure_future(commits.submit("b", 14))
    await settle()
    # "b" does not wait for "a"; "a"'s next batch waits for the one running.
    assert recorder.batches == [("a", [2]), ("a", [4]), ("b", [14])]
    recorder.gate.set()
    assert await asyncio.gather(first, *waiting, other) == [40, 60, 80, 100, 120, 140]
    assert recorder.batches[3:] == [("a", [6, 8, 10]), ("a", [12])]


async def test_each_item_gets_its_own_error_and_a_failed_flush_fails_its_whole_batch_only() -> None:
    recorder = Recorder()
    commits = GroupCommit(recorder.flush)
    results = await asyncio.gather(*(commits.submit("a", i) for i in range(4)), return_exceptions=True)
    assert [r if isinstance(r, int) else r.message for r in results] == [0, "odd 1", 20, "odd 3"]

    calls = 0

    async def broken(key: str, items: list[int]) -> list[object]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("database went away")
        return items

    commits = GroupCommit(broken)
    results = await asyncio.gather(*(commits.submit("a", i) for i in range(3)), return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError, RuntimeError, RuntimeError]
    assert await commits.submit("a", 7) == 7  # the key keeps working


async def test_a_caller_that_leaves_does_not_take_its_item_out_of_a_running_batch() -> None:
    recorder = Recorder()
    commits = GroupCommit(recorder.flush)
    recorder.gate.clear()
    leaving = asyncio.ensure_future(commits.submit("a", 2))
    staying = asyncio.ensure_future(commits.submit("a", 4))
    await settle()
    leaving.cancel()
    await settle()
    recorder.gate.set()
    assert await staying == 40
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert recorder.batches == [("a", [2, 4])]


def test_a_batch_holds_at_least_one_item() -> None:
    with pytest.raises(ValueError):
        GroupCommit(Recorder().flush, max_items=0)
