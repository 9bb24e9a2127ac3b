"""Market gRPC servicer and the consumer of market.prices.

Queries read the stored ticks only (never Kafka), so an answer is reproducible: the
same stored ticks give the same TWAP. Missing data is FAILED_PRECONDITION naming the
gap (see ``domain``); a window that has not ended yet is FAILED_PRECONDITION too.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import asyncpg
import grpc

from services.kernel import events, idempotency
from services.kernel.clock import micros_field
from services.kernel.config import Settings
from services.kernel.errors import FailedPrecondition, InvalidArgument, NotFound
from services.kernel.grpcserver import GATEWAY, OPERATOR, SERVICE
from services.kernel.money import format_amount
from services.market import domain, metrics, store
from services.market.store import NewTick

from earn.v1 import market_pb2 as mk, market_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "earn.v1.MarketService"
_QUERY = frozenset({GATEWAY, OPERATOR, SERVICE})
ROLES = {
    f"{SERVICE_NAME}/{method}": roles
    for method, roles in {
        "GetIndex": _QUERY,
        "GetTwap": _QUERY,
        "BackfillPrices": frozenset({OPERATOR}),
    }.items()
}


def _stamp(message: Any, at_us: int) -> None:
    message.FromDatetime(domain.from_micros(at_us))


def parse_tick_event(raw: bytes) -> NewTick:
    """A market.prices record as a tick to store; raises DecodeError, ValueError or
    InvalidArgument for a record that can never be applied."""
    env = events.parse(raw)
    tick = events.unwrap(env, mk.PriceTick)
    event_id = uuid.UUID(env.event_id)
    pair = domain.parse_pair(tick.pair)
    price = domain.parse_price(tick.price, pair)
    at_us = micros_field(tick, "event_time")
    assert at_us is not None
    source = domain.check_source(tick.source or env.producer or "exchange")
    return NewTick(pair.name, at_us, price, source, event_id)


class MarketApi(market_pb2_grpc.MarketServiceServicer):
    def __init__(self, pool: asyncpg.Pool, settings: Settings, max_gap_seconds: float) -> None:
        self.pool = pool
        self.settings = settings
        self.max_gap_us = int(max_gap_seconds * domain.US)

    def _now_us(self) -> int:
        return domain.micros(self.settings.clock.now())

    # ---- consumer ----------------------------------------------------------------

    async def apply_ticks(self, ticks: list[NewTick]) -> int:
        """Store a batch of ticks from the topic (one transaction); returns how many were new."""
        async with self.pool.acquire() as conn, conn.transaction():
            stored = await store.insert_ticks(conn, ticks)
        self._count(ticks, stored)
        return len(stored)

    def _count(self, ticks: list[NewTick], stored: list[NewTick]) -> None:
        new = {(t.pair, t.at_us) for t in stored}
        for t in ticks:
            metrics.TICKS.labels(t.pair, "stored" if (t.pair, t.at_us) in new else "duplicate").inc()
        newest: dict[str, int] = {}
        for t in stored:
            newest[t.pair] = max(newest.get(t.pair, 0), t.at_us)
        for pair, at_us in newest.items():
            metrics.LAST_TICK.labels(pair).set(at_us / domain.US)

    # ---- queries -----------------------------------------------------------------

    async def GetIndex(self, request: mk.GetIndexRequest, context: grpc.aio.ServicerContext) -> mk.GetIndexResponse:
        pair = domain.parse_pair(request.pair)
        at_us = micros_field(request, "at") if request.HasField("at") else None
        row = await store.latest(self.pool, pair.name, at_us)
        if row is None:
            when = "" if at_us is None else f" at or before {domain.iso(at_us)}"
            raise NotFound(f"pair: no index price for {pair.name}{when}")
        response = mk.GetIndexResponse(pair=pair.name, price=format_amount(row["price"]), source=row["source"])
        _stamp(response.event_time, row["at_us"])
        return response

    async def GetTwap(self, request: mk.GetTwapRequest, context: grpc.aio.ServicerContext) -> mk.GetTwapResponse:
        pair = domain.parse_pair(request.pair)
        start_us = micros_field(request, "start")
        end_us = micros_field(request, "end")
        assert start_us is not None and end_us is not None
        domain.check_window(start_us, end_us)
        now_us = self._now_us()
        if end_us > now_us:
            raise FailedPrecondition(f"end: the window ends at {domain.iso(end_us)}, after now ({domain.iso(now_us)}); ask once it is over")
        ticks = await store.window(self.pool, pair.name, start_us, end_us)
        try:
            result = domain.twap(pair, ticks, start_us, end_us, self.max_gap_us)
        except FailedPrecondition:
            metrics.TWAP_REFUSED.labels(pair.name).inc()
            raise
        response = mk.GetTwapResponse(pair=pair.name, twap=format_amount(result.price), ticks=result.ticks, max_gap_seconds=result.max_age_us / domain.US)
        _stamp(response.first_tick_time, result.first_us)
        _stamp(response.last_tick_time, result.last_us)
        return response

    # ---- operator ----------------------------------------------------------------

    async def BackfillPrices(self, request: mk.BackfillPricesRequest, context: grpc.aio.ServicerContext) -> mk.BackfillPricesResponse:
        idempotency.check_key(request.idempotency_key)
        pair = domain.parse_pair(request.pair)
        source = domain.check_source(request.source or "backfill")
        if not request.ticks:
            raise InvalidArgument("ticks", "at least one tick is required")
        if len(request.ticks) > domain.MAX_BACKFILL:
            raise InvalidArgument("ticks", f"at most {domain.MAX_BACKFILL} ticks per request")
        now_us = self._now_us()
        ticks: list[NewTick] = []
        seen: set[int] = set()
        for i, t in enumerate(request.ticks):
            price = domain.parse_price(t.price, pair, f"ticks[{i}].price")
            at_us = micros_field(t, "event_time", name=f"ticks[{i}].event_time")
            assert at_us is not None
            if at_us > now_us:
                raise InvalidArgument(f"ticks[{i}].event_time", f"{domain.iso(at_us)} is in the future")
            if at_us in seen:
                raise InvalidArgument(f"ticks[{i}].event_time", f"{domain.iso(at_us)} appears twice in the request")
            seen.add(at_us)
            ticks.append(NewTick(pair.name, at_us, price, source, None))
        stored_now: list[NewTick] = []

        async def work(conn: asyncpg.Connection) -> mk.BackfillPricesResponse:
            stored = await store.insert_ticks(conn, ticks)
            stored_now.extend(stored)
            return mk.BackfillPricesResponse(inserted=len(stored), already_stored=len(ticks) - len(stored))

        response = await idempotency.write_once(self.pool, method="BackfillPrices", request=request, response_type=mk.BackfillPricesResponse, work=work)
        if stored_now:
            self._count(ticks, stored_now)
        log.info("prices backfilled", extra={"pair": pair.name, "inserted": response.inserted, "already_stored": response.already_stored})
        return response

