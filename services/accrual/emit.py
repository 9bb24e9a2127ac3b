"""Payout batches out of the engine: one emitter for every agent that pays.

A payout request (``PayoutRequested``) makes each partition send its items as
``PayoutBatch`` messages: parallel columns, one product (or pool) per batch, at most
``batch_size`` items, sent as they fill; the last batch (possibly empty) is flagged so the
sink knows the partition is done. Everything is deterministic: the same state and the
same request give the same batches with the same event ids (``uuid5`` of the agent's
namespace, job, period, partition and sequence), so a re-emission after a crash is
dropped by the sink's inbox.

The request's offset may be committed only once every batch is in the log:
:meth:`PayoutEmitter.finish` waits for the broker's acknowledgements, and a broker that
does not acknowledge within ``DELIVERY_TIMEOUT`` makes the process exit (code 70) rather
than stall the partition; the restart re-emits the same batches.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter

from earn.v1 import accrual_pb2
from services.kernel import events
from services.kernel.topics import CATALOGUE

log = logging.getLogger(__name__)

PRODUCER = "accrual"
DELIVERY_TIMEOUT = 120.0


def batch_event_id(namespace: str, job: str, period: str, partition: int, sequence: int) -> uuid.UUID:
    """The envelope id of batch ``sequence`` of a partition's answer to (job, period)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}:{job}:{period}:{partition}:{sequence}")


class PayoutEmitter:
    """A partition's payout batches for one request.

    ``output`` is the faust topic the batches go to (its catalogue name is ``topic``), ``key``
    the record key of every batch, ``namespace`` the prefix of the batch event ids;
    ``items`` counts the items emitted (re-emissions included)."""

    def __init__(
        self,
        output: Any,
        topic: str,
        partition: int,
        msg: accrual_pb2.PayoutRequested,
        *,
        key: str,
        namespace: str,
        batch_size: int,
        items: Counter,
    ) -> None:
        self.output, self.partition, self.msg = output, partition, msg
        self.output_partitions = CATALOGUE[topic].partitions
        self.key, self.namespace, self.batch_size, self.items = key, namespace, batch_size, items
        self.sequence = 0
        self.pending: list[asyncio.Future[Any]] = []
        self.product_id = self.asset = ""
        self._batch_product = self._batch_asset = ""
        self._clear()

    def _clear(self) -> None:
        self.position_ids: list[str] = []
        self.user_ids: list[str] = []
        self.amounts: list[str] = []
        self.from_hours: list[int] = []

    def product(self, product_id: str, asset: str) -> None:
        """The product (or pool) and asset of the items added from now on."""
        self.product_id, self.asset = product_id, asset

    async def _open(self) -> None:
        """Close the batch being filled if it is for another product; start one if none."""
        if self.position_ids and self._batch_product != self.product_id:
            await self._send(last=False)
        if not self.position_ids:
            self._batch_product, self._batch_asset = self.product_id, self.asset

    async def add(self, position_id: str, user_id: str, amount: str, from_hour: int) -> None:
        """One item of the current product."""
        await self._open()
        self.position_ids.append(position_id)
        self.user_ids.append(user_id)
        self.amounts.append(amount)
        self.from_hours.append(from_hour)
        if len(self.position_ids) >= self.batch_size:
            await self._send(last=False)

    async def extend(self, position_ids: Sequence[str], user_ids: Sequence[str], amounts: Sequence[str], from_hours: Sequence[int]) -> None:
        """Items of the current product as parallel columns; full batches leave at once."""
        at, count = 0, len(position_ids)
        while at < count:
            await self._open()
            take = min(count - at, self.batch_size - len(self.position_ids))
            self.position_ids.extend(position_ids[at : at + take])
            self.user_ids.extend(user_ids[at : at + take])
            self.amounts.extend(amounts[at : at + take])
            self.from_hours.extend(from_hours[at : at + take])
            at += take
            if len(self.position_ids) >= self.batch_size:
                await self._send(last=False)

    async def _send(self, last: bool) -> None:
        msg, filled = self.msg, bool(self.position_ids)
        batch = accrual_pb2.PayoutBatch(
            job=msg.job,
            period=msg.period,
            boundary_hour=msg.boundary_hour,
            partition=self.partition,
            sequence=self.sequence,
            last=last,
            product_id=self._batch_product if filled else "",
            asset=self._batch_asset if filled else "",
            position_ids=self.position_ids,
            user_ids=self.user_ids,
            amounts=self.amounts,
            from_hours=self.from_hours,
        )
        env = events.wrap(
            batch,
            key=self.key,
            producer=PRODUCER,
            occurred_at=datetime.now(UTC),
            event_id=batch_event_id(self.namespace, msg.job, msg.period, self.partition, self.sequence),
        )
        self.pending.append(
            await self.output.send(
                key=self.key.encode(),
                value=env.SerializeToString(deterministic=True),
                partition=self.partition % self.output_partitions,
                force=True,  # now, not at commit: delivery is awaited in finish()
            )
        )
        self.items.inc(len(self.position_ids))
        self.sequence += 1
        self._clear()

    async def finish(self) -> None:
        """Send the last batch, then wait until every batch is in the log."""
        await self._send(last=True)
        where = {"namespace": self.namespace, "job": self.msg.job, "period": self.msg.period, "partition": self.partition}
        started = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*self.pending), DELIVERY_TIMEOUT)
        except asyncio.TimeoutError:
            log.critical("payout batches not acknowledged in time: exiting for a restart", extra=where)
            os._exit(70)
        log.info("payout batches delivered", extra={**where, "batches": self.sequence, "wait_s": round(time.perf_counter() - started, 4)})
