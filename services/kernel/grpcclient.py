"""The one way a process opens a gRPC channel to another process.

Every client (services, the scheduler's jobs, tools, tests) calls :func:`channel` or
:func:`sync_channel` instead of ``grpc.aio.insecure_channel``, so transport security is
decided in one place.
"""

from __future__ import annotations

import grpc


def channel(address: str) -> grpc.aio.Channel:
    """An asyncio channel to ``address`` (host:port)."""
    return grpc.aio.insecure_channel(address)


def sync_channel(address: str) -> grpc.Channel:
    """A blocking channel to ``address`` (host:port), for synchronous tools."""
    return grpc.insecure_channel(address)
