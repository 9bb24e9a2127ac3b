"""Smart Leverage process: migrate, serve gRPC, keep the exposure gauge from the store,
release the holds of quotes that expired without a position. It calls the wallet (holds,
transfers, the treasury's balance) and the market (index, TWAP) over gRPC."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from services.kernel import grpcclient

from services.kernel import db, logs, loops, peers
from services.kernel.config import load
from services.kernel.grpcserver import GrpcApp
from services.leverage.api import ROLES, SERVICE_NAME, LeverageApi, LeverageSettings

from earn.v1 import leverage_pb2_grpc

log = logging.getLogger(__name__)

SCHEMA = "leverage"
MIGRATIONS = Path(__file__).parent / "migrations"


async def sweep(api: LeverageApi) -> None:
    await api.release_abandoned()
    await api.refresh_exposure()


async def main() -> None:
    settings = load(LeverageSettings)
    logs.configure(settings.log_level)
    await db.migrate(settings, SCHEMA, MIGRATIONS)
    pool = await db.create_pool(settings, SCHEMA)
    wallet = grpcclient.channel(settings.wallet_address)
    market = grpcclient.channel(settings.market_address)
    api = LeverageApi(pool, settings, peers.wallet(wallet, settings.service_token), peers.market(market, settings.service_token))
    await api.refresh_exposure()
    app = GrpcApp("leverage", settings, ROLES)
    app.add_servicer(leverage_pb2_grpc.add_LeverageServiceServicer_to_server, api, SERVICE_NAME)
    app.background(lambda: loops.every(settings.release_sweep_seconds, lambda: sweep(api), "release sweep failed"))
    app.on_stop(pool.close)
    app.on_stop(lambda: wallet.close())
    app.on_stop(lambda: market.close())
    await app.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
