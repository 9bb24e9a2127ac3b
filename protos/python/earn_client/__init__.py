"""Client helpers for the earn platform's gRPC services.

The services identify callers by a bearer token in the ``authorization`` metadata (each
token maps to a role: gateway, operator or service) and refuse calls without one, except
health and reflection. ``connect`` and ``connect_aio`` open a channel that adds
``authorization: Bearer <token>`` to every call; ``wallet``, ``simple_earn``,
``launchpool``, ``candydrop``, ``hodler``, ``market``, ``dual``, ``leverage`` and ``loan``
return the generated stub of that service for a channel (sync or asyncio)::

    from earn.v1 import wallet_pb2
    import earn_client

    with earn_client.connect("127.0.0.1:50051", "dev-gateway") as channel:
        reply = earn_client.wallet(channel).GetBalances(wallet_pb2.GetBalancesRequest(owner="alice"), timeout=5)

The messages are ``earn.v1.*_pb2`` (with ``.pyi`` type stubs), the service stubs
``earn.v1.*_pb2_grpc``. With ``tls_dir`` (the platform's certificate directory, e.g.
``.data/tls`` of `make run`) the channel is mTLS: it trusts ``ca.pem`` there and presents
``<identity>.pem``/``.key`` (default identity ``tool``, whose role the token names);
without, plaintext (services running without EARN_TLS_DIR). Every RPC is unary.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from earn.v1 import (
    candydrop_pb2_grpc,
    dual_pb2_grpc,
    hodler_pb2_grpc,
    launchpool_pb2_grpc,
    leverage_pb2_grpc,
    loan_pb2_grpc,
    market_pb2_grpc,
    simple_earn_pb2_grpc,
    wallet_pb2_grpc,
)

__all__ = [
    "candydrop", "connect", "connect_aio", "dual", "hodler", "launchpool", "leverage", "loan", "market", "simple_earn", "wallet",
]

_AUTHORIZATION = "authorization"

ChannelOptions = Sequence[tuple[str, Any]]


def _with_token(metadata: Any, token: str) -> list[tuple[str, str | bytes]]:
    """The call's metadata plus the bearer token, unless the call names its own."""
    pairs = [(key, value) for key, value in (metadata or ())]
    if not any(key.lower() == _AUTHORIZATION for key, _ in pairs):
        pairs.append((_AUTHORIZATION, f"Bearer {token}"))
    return pairs


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(
            _CallDetails(
                details.method,
                details.timeout,
                _with_token(details.metadata, self._token),
                details.credentials,
                details.wait_for_ready,
                getattr(details, "compression", None),
            ),
            request,
        )


class _AioBearerToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        metadata = grpc.aio.Metadata(*_with_token(details.metadata, self._token))
        return await continuation(details._replace(metadata=metadata), request)


def _check(token: str) -> None:
    if not token or token != token.strip() or "\n" in token:
        raise ValueError("token: a non-empty bearer token without surrounding whitespace is required")


def _credentials(tls_dir: str, identity: str) -> grpc.ChannelCredentials:
    directory = Path(tls_dir)
    return grpc.ssl_channel_credentials(
        root_certificates=(directory / "ca.pem").read_bytes(),
        private_key=(directory / f"{identity}.key").read_bytes(),
        certificate_chain=(directory / f"{identity}.pem").read_bytes(),
    )


def connect(
    address: str, token: str, *, options: ChannelOptions | None = None, tls_dir: str | None = None, identity: str = "tool"
) -> grpc.Channel:
    """A channel to ``address`` (host:port) that sends ``token`` with every call: mTLS
    with ``identity``'s certificate from ``tls_dir`` when given, else plaintext.

    Use it as a context manager, or call ``close()``.
    """
    _check(token)
    if tls_dir:
        channel = grpc.secure_channel(address, _credentials(tls_dir, identity), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _BearerToken(token))


def connect_aio(
    address: str, token: str, *, options: ChannelOptions | None = None, tls_dir: str | None = None, identity: str = "tool"
) -> grpc.aio.Channel:
    """The asyncio variant of ``connect``: ``async with connect_aio(...) as channel``."""
    _check(token)
    if tls_dir:
        creds = _credentials(tls_dir, identity)
        return grpc.aio.secure_channel(address, creds, options=options, interceptors=[_AioBearerToken(token)])
    return grpc.aio.insecure_channel(address, options=options, interceptors=[_AioBearerToken(token)])


def wallet(channel: grpc.Channel | grpc.aio.Channel) -> wallet_pb2_grpc.WalletServiceStub:
    """The stub of ``earn.v1.WalletService`` (the funding ledger) on ``channel``."""
    return wallet_pb2_grpc.WalletServiceStub(channel)


def simple_earn(channel: grpc.Channel | grpc.aio.Channel) -> simple_earn_pb2_grpc.SimpleEarnServiceStub:
    """The stub of ``earn.v1.SimpleEarnService`` (savings products) on ``channel``."""
    return simple_earn_pb2_grpc.SimpleEarnServiceStub(channel)


def launchpool(channel: grpc.Channel | grpc.aio.Channel) -> launchpool_pb2_grpc.LaunchpoolServiceStub:
    """The stub of ``earn.v1.LaunchpoolService`` (stake to farm a new token) on ``channel``."""
    return launchpool_pb2_grpc.LaunchpoolServiceStub(channel)


def candydrop(channel: grpc.Channel | grpc.aio.Channel) -> candydrop_pb2_grpc.CandyDropServiceStub:
    """The stub of ``earn.v1.CandyDropService`` (task campaigns with prize pools) on ``channel``."""
    return candydrop_pb2_grpc.CandyDropServiceStub(channel)


def hodler(channel: grpc.Channel | grpc.aio.Channel) -> hodler_pb2_grpc.HodlerServiceStub:
    """The stub of ``earn.v1.HodlerService`` (airdrops to holders) on ``channel``."""
    return hodler_pb2_grpc.HodlerServiceStub(channel)


def market(channel: grpc.Channel | grpc.aio.Channel) -> market_pb2_grpc.MarketServiceStub:
    """The stub of ``earn.v1.MarketService`` (index prices, TWAPs) on ``channel``."""
    return market_pb2_grpc.MarketServiceStub(channel)


def dual(channel: grpc.Channel | grpc.aio.Channel) -> dual_pb2_grpc.DualServiceStub:
    """The stub of ``earn.v1.DualService`` (Dual Investment plans) on ``channel``."""
    return dual_pb2_grpc.DualServiceStub(channel)


def leverage(channel: grpc.Channel | grpc.aio.Channel) -> leverage_pb2_grpc.LeverageServiceStub:
    """The stub of ``earn.v1.LeverageService`` (Smart Leverage) on ``channel``."""
    return leverage_pb2_grpc.LeverageServiceStub(channel)


def loan(channel: grpc.Channel | grpc.aio.Channel) -> loan_pb2_grpc.LoanServiceStub:
    """The stub of ``earn.v1.LoanService`` (Crypto Loan) on ``channel``."""
    return loan_pb2_grpc.LoanServiceStub(channel)
