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

import logging
from typing import Any

import grpc
from google.protobuf.message import Message

from services.kernel.errors import DomainError, FailedPrecondition, NotFound

from earn.v1 import market_pb2_grpc, wallet_pb2_grpc

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 30
_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


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
