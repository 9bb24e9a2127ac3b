"""Wallet process: migrate, create topics, serve gRPC, run the outbox relay."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from services.kernel import db, logs, topics
from services.kernel.config import ServiceSettings, load
from services.kernel.grpcserver import GrpcApp
from services.kernel.outbox import Relay
from services.wallet import store
from services.wallet.api import ROLES, SERVICE_NAME, WalletApi

from earn.v1 import wallet_pb2_grpc

SCHEMA = "wallet"
MIGRATIONS = Path(__file__).parent / "migrations"


class WalletSettings(ServiceSettings):
    grpc_port: int = 50051
    metrics_port: int = 9101


async def fold_pending_credits(pool: asyncpg.Pool) -> None:
    """Fold pending bulk credits into balances in the background, a few thousand accounts
    at a time, so payouts stay cheap on their critical path and reads stay short."""
    while True:
        if await store.fold_some_pending(pool) == 0:
            await asyncio.sleep(1.0)


async def main() -> None:
    settings = load(WalletSettings)
    logs.configure(settings.log_level)
    await db.migrate(settings, SCHEMA, MIGRATIONS)
    await asyncio.to_thread(topics.ensure_topics, settings, ["wallet.transfers"])
    pool = await db.create_pool(settings, SCHEMA)
    app = GrpcApp("wallet", settings, ROLES)
    app.add_servicer(wallet_pb2_grpc.add_WalletServiceServicer_to_server, WalletApi(pool, settings), SERVICE_NAME)
    if settings.relay_enabled:
        app.background(Relay(settings, pool, SCHEMA).run)
    app.background(lambda: fold_pending_credits(pool))
    app.on_stop(pool.close)
    await app.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
