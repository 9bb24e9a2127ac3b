"""Calls to another service of the platform over gRPC, as this service.

A :class:`Peer` sends this service's token (``authorization: Bearer <token>``, the
service role) with a 30-second deadline and turns the peer's answer into domain errors
(``services.kernel.errors``) that the gRPC layer maps back to a status:

- UNAVAILABLE or DEADLINE_EXCEEDED: :class:`Unavailable`, "<peer> is unavailable; <retry>"
  where ``retry`` says how the caller gets the work done (the same key, the next run...);
- FAILED_PRECONDITION: :class:`FailedPrecondition` with the peer's own words;
- NOT_FOUND (unless ``not_found=False``): :class:`NotFound` with the peer's own words;
- anything else is logged and raised as it came.

A service with another policy for refusals overrides :meth:`Peer.refused`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

import grpc
from google.protobuf.message import Message

from services.kernel import idempotency
from services.kernel.errors import DomainError, FailedPrecondition, NotFound
from services.kernel.money import format_amount

from earn.v1 import market_pb2_grpc, wallet_pb2, wallet_pb2_grpc

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 30
_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


TOO_MANY_ATTEMPTS = "idempotency_key: this request failed too many times; retry with a new key"


class Unavailable(DomainError):
    code = "UNAVAILABLE"


class Peer:
    """A peer service over gRPC with this service's token; refusals become domain errors."""

    def __init__(self, stub: Any, token: str, name: str, *, retry: str = "retry with the same key", not_found: bool = True) -> None:
        self.stub = stub
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.name = name
        self.retry = retry
        self.not_found = not_found

    async def call(self, method: str, request: Message) -> Any:
        try:
            return await getattr(self.stub, method)(request, metadata=self.metadata, timeout=TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as err:
            if err.code() in _UNAVAILABLE:
                raise Unavailable(f"{self.name} is unavailable; {self.retry}") from None
            mapped = self.refused(method, err)
            if mapped is None:
                raise
            raise mapped from None

    def refused(self, method: str, err: grpc.aio.AioRpcError) -> DomainError | None:
        """The domain error for a refusal, or None to raise the gRPC error as it came."""
        code = err.code()
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return FailedPrecondition(err.details() or f"{self.name} refused")
        if code == grpc.StatusCode.NOT_FOUND and self.not_found:
            return NotFound(err.details() or f"{self.name}: not found")
        log.error("peer call failed", extra={"peer": self.name, "method": method, "code": code.name, "details": err.details()})
        return None


def wallet(channel: grpc.aio.Channel, token: str, **options: Any) -> Peer:
    return Peer(wallet_pb2_grpc.WalletServiceStub(channel), token, "wallet", **options)


def market(channel: grpc.aio.Channel, token: str, **options: Any) -> Peer:
    return Peer(market_pb2_grpc.MarketServiceStub(channel), token, "market", **options)


async def place_hold(
    wallet: Peer,
    key_prefix: str,
    method: str,
    request: Message,
    *,
    owner: str,
    asset: str,
    amount: Decimal,
    holder: str,
    reference: str,
    abandoned: Callable[[int], Awaitable[bool]] | None,
    attempts: int = 5,
    first_attempt: int = 0,
    key: str | None = None,
    refused: str = TOO_MANY_ATTEMPTS,
) -> int:
    """The wallet hold of a client write (Simple Earn's Subscribe, Launchpool's Stake,
    Dual's SubscribeDual), placed before the write's transaction: under the wallet key
    ``<key_prefix>:<sha256 of the client key and the request fingerprint>:<attempt>``
    (``key`` defaults to the request's ``idempotency_key``), so a retry of the same request
    gets the same hold back. A hold the service has ``abandoned`` (an earlier attempt
    failed and released it) is never used again: the next attempt asks for a new one;
    after ``attempts``, FAILED_PRECONDITION ``refused``. A caller that checks for an
    abandoned hold itself, later (``abandoned`` None), asks again from ``first_attempt``
    = the next attempt number when it finds one."""
    key = getattr(request, "idempotency_key") if key is None else key
    base = hashlib.sha256(key.encode() + b"\0" + idempotency.fingerprint(method, request)).hexdigest()[:40]
    for attempt in range(first_attempt, attempts):
        reply = await wallet.call(
            "PlaceHold",
            wallet_pb2.PlaceHoldRequest(
                idempotency_key=f"{key_prefix}:{base}:{attempt}", owner=owner, asset=asset, amount=format_amount(amount),
                holder=holder, reference=reference,
            ),
        )
        hold_id = int(reply.hold.hold_id)
        if abandoned is None or not await abandoned(hold_id):
            return hold_id
    raise FailedPrecondition(refused)


async def release_holds(wallet: Peer, releases: Iterable[Mapping[str, Any]], done: Callable[[int], Awaitable[object]]) -> int:
    """Send the wallet releases a service committed and has not seen confirmed (rows of
    ``id``, ``key``, ``hold_id``, ``amount``), each under its own deterministic key, and
    record each confirmed one (``done(id)``); a refused one is logged and left for the next
    sweep. Safe to run concurrently and repeatedly. Returns how many were confirmed."""
    confirmed = 0
    for r in releases:
        try:
            await wallet.call(
                "ReleaseHold", wallet_pb2.ReleaseHoldRequest(idempotency_key=r["key"], hold_id=str(r["hold_id"]), amount=format_amount(r["amount"])),
            )
        except DomainError as err:
            log.error("hold release failed; will retry", extra={"release": r["key"], "error": err.message})
            continue
        await done(r["id"])
        confirmed += 1
    return confirmed
