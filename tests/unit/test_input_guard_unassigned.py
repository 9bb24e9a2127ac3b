"""The engine's input watchdog: a worker left without any partition after a rebalance
(the group rebalanced while a restarted broker did not know the topics yet, seen in the
mixed chaos scenario after a broker SIGKILL) exits for a restart once it has been idle
longer than a stall, instead of consuming nothing forever."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from services.accrual import delivery
from services.accrual.delivery import InputGuard


class Exited(Exception):
    pass


def app(*, unassigned: bool, rebalancing: bool = False) -> SimpleNamespace:
    return SimpleNamespace(unassigned=unassigned, rebalancing=rebalancing, in_recovery=False,
                           consumer=SimpleNamespace(assignment=lambda: set()))


async def apply(partition: int, offset: int, value: bytes) -> None:
    return None


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise Exited

    monkeypatch.setattr(delivery.os, "_exit", fake_exit)
    return codes


def guard(idle: float) -> InputGuard:
    g = InputGuard("simple_earn", apply, reader=SimpleNamespace(topic="t.simple_earn.accrual"))  # type: ignore[arg-type]
    g.active = time.monotonic() - idle
    return g


def test_unassigned_longer_than_a_stall_exits_70(exits: list[int]) -> None:
    with pytest.raises(Exited):
        asyncio.run(guard(idle=20).watch(app(unassigned=True), stall_seconds=15))
    assert exits == [70]


def test_unassigned_briefly_or_while_rebalancing_waits(exits: list[int]) -> None:
    asyncio.run(guard(idle=5).watch(app(unassigned=True), stall_seconds=15))
    asyncio.run(guard(idle=20).watch(app(unassigned=True, rebalancing=True), stall_seconds=15))
    asyncio.run(guard(idle=20).watch(app(unassigned=False), stall_seconds=15))  # assigned, nothing of this topic
    assert exits == []
