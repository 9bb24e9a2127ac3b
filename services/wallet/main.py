"""Wallet process: migrate, create topics, serve gRPC, run the outbox relay and the
bulk credit folder."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg
from prometheus_client import Counter, Gauge

from services.kernel import db, logs, topics
from services.kernel.config import ServiceSettings, load
from services.kernel.grpcserver import GrpcApp
from services.kernel.outbox import Relay
from services.wallet import store
from services.wallet.api import ROLES, SERVICE_NAME, WalletApi

from earn.v1 import wallet_pb2_grpc

SCHEMA = "wallet"
MIGRATIONS = Path(__file__).parent / "migrations"

log = logging.getLogger(__name__)

FOLDED = Counter("earn_wallet_bulk_credits_folded_total", "Bulk credits folded into transfers and balances")
UNFOLDED = Gauge("earn_wallet_bulk_credits_unfolded", "Bulk credits (credits, not requests) waiting to be folded")


class WalletSettings(ServiceSettings):
    grpc_port: int = 50051
    metrics_port: int = 9101
    # Run the bulk credit folder in this process. Several may run (each folds other bulk
    # credits); with none, balances stay exact and credits wait in their columns.
    fold_enabled: bool = True
    fold_idle_seconds: float = 0.5
    # Folds running at once in this process (each a transaction of its own bulk credit).
    fold_tasks: int = 2
    # Folding waits while this process posted a bulk credit less than this long ago (a
    # payout in progress keeps the database for itself), unless the backlog is over
    # fold_max_backlog credits. Balances are exact either way.
    fold_quiet_seconds: float = 1.0
    fold_max_backlog: int = 5_000_000


async def fold_bulk_credits(pool: asyncpg.Pool, settings: WalletSettings) -> None:
    """Fold bulk credits into per-user transfers and balances, oldest first, one per
    transaction, off the payout's critical path: after a quiet moment (or when the
    backlog is too big); poll when there is nothing to fold."""
    while True:
        try:
            quiet = store.BulkActivity.quiet_for()
            if quiet < settings.fold_quiet_seconds:
                backlog = (await store.unfolded_backlog(pool))[1]
                UNFOLDED.set(backlog)
                if backlog < settings.fold_max_backlog:
                    await asyncio.sleep(settings.fold_quiet_seconds - quiet)
                    continue
            folded = await store.fold_next_bulk_credit(pool)
            FOLDED.inc(folded)
            UNFOLDED.set((await store.unfolded_backlog(pool))[1])
        except (asyncpg.PostgresConnectionError, OSError) as err:  # the database restarts: try again
            log.warning("bulk credit fold failed; retrying", extra={"error": str(err)})
            folded = 0
        if folded == 0:
            await asyncio.sleep(settings.fold_idle_seconds)


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
    if settings.fold_enabled:
        for _ in range(settings.fold_tasks):
            app.background(lambda: fold_bulk_credits(pool, settings))
    app.on_stop(pool.close)
    await app.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
