"""Dual Investment process: migrate, serve gRPC, release abandoned holds in the background.
It calls the wallet (holds, transfers) and the market (settlement prices) over gRPC."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from services.kernel import grpcclient

from services.dual.api import ROLES, SERVICE_NAME, DualApi
from services.kernel import db, logs, loops, peers
from services.kernel.config import ServiceSettings, load
from services.kernel.grpcserver import GrpcApp

from earn.v1 import dual_pb2_grpc

log = logging.getLogger(__name__)

SCHEMA = "dual"
MIGRATIONS = Path(__file__).parent / "migrations"


class DualSettings(ServiceSettings):
    grpc_port: int = 50056
    metrics_port: int = 9106
    wallet_address: str = "127.0.0.1:50051"
    market_address: str = "127.0.0.1:50055"
    # Sent to the wallet and the market as `authorization: Bearer <token>` (service role).
    service_token: str = "dev-service"
    release_sweep_seconds: float = 5.0


async def main() -> None:
    settings = load(DualSettings)
    logs.configure(settings.log_level)
    await db.migrate(settings, SCHEMA, MIGRATIONS)
    pool = await db.create_pool(settings, SCHEMA)
    wallet = grpcclient.channel(settings.wallet_address)
    market = grpcclient.channel(settings.market_address)
    api = DualApi(pool, settings, peers.wallet(wallet, settings.service_token), peers.market(market, settings.service_token))
    app = GrpcApp("dual", settings, ROLES)
    app.add_servicer(dual_pb2_grpc.add_DualServiceServicer_to_server, api, SERVICE_NAME)
    app.background(lambda: loops.every(settings.release_sweep_seconds, api.release_abandoned, "release sweep failed"))
    app.on_stop(pool.close)
    app.on_stop(lambda: wallet.close())
    app.on_stop(lambda: market.close())
    await app.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
