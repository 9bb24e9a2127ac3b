"""The one way a process opens a gRPC channel to another process.

Every client (services, the scheduler's jobs, tools, tests) calls :func:`channel` or
:func:`sync_channel` instead of ``grpc.aio.insecure_channel``, so transport security is
decided in one place:

- ``EARN_TLS_DIR`` empty (the default): plaintext; the callee identifies the caller by its
  bearer token only.
- ``EARN_TLS_DIR`` set: mTLS. The channel trusts only the CA in that directory and presents
  the certificate of ``identity`` (default ``EARN_TLS_IDENTITY``, else ``tool``); the callee
  takes the caller's role from that certificate (``grpcserver.IDENTITY_ROLES``).

``tls_dir`` and ``identity`` override the settings for one channel (tests that act as
several callers, supervisors that check a child's health).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import grpc

from services.kernel import tls
from services.kernel.config import Settings

TOOL = "tool"

Options = Sequence[tuple[str, Any]] | None


@lru_cache(maxsize=1)
def _settings() -> Settings:
    return Settings()


@lru_cache(maxsize=64)
def _credentials(directory: str, identity: str) -> grpc.ChannelCredentials:
    creds = tls.load(directory, identity)
    return grpc.ssl_channel_credentials(root_certificates=creds.ca, private_key=creds.key, certificate_chain=creds.cert)


def credentials(*, tls_dir: str | None = None, identity: str | None = None) -> grpc.ChannelCredentials | None:
    """The channel credentials for these settings; None when TLS is off."""
    settings = _settings()
    directory = settings.tls_dir if tls_dir is None else tls_dir
    if not directory:
        return None
    return _credentials(str(directory), identity or settings.tls_identity or TOOL)


def channel(address: str, options: Options = None, *, tls_dir: str | None = None, identity: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``address`` (host:port)."""
    creds = credentials(tls_dir=tls_dir, identity=identity)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, creds, options=options)


def sync_channel(address: str, options: Options = None, *, tls_dir: str | None = None, identity: str | None = None) -> grpc.Channel:
    """A blocking channel to ``address`` (host:port), for synchronous tools."""
    creds = credentials(tls_dir=tls_dir, identity=identity)
    if creds is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, creds, options=options)
