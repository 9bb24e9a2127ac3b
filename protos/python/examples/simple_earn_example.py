"""earn.v1.SimpleEarnService with earn-client (asyncio): list products, subscribe, list positions.

Against `make run` (Simple Earn on 127.0.0.1:50052, the dev tokens); the user needs funds
in the wallet first, which the wallet example deposits:

    python protos/python/examples/wallet_example.py --owner alice --amount 1.5
    python protos/python/examples/simple_earn_example.py --user alice --amount 0.1

If the product (default `example-btc-flex`, flexible, 8% APR up to 5 BTC, 3% above) does
not exist yet, the example creates it with the operator token. Subscribe needs the
gateway role (the exchange's API gateway acting for the user named in the request).
Tokens default to $EARN_OPERATOR_TOKEN / $EARN_GATEWAY_TOKEN, then to the dev tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid

import grpc

import earn_client
from earn.v1 import accrual_pb2, simple_earn_pb2 as se


async def run(args: argparse.Namespace) -> None:
    async with earn_client.connect_aio(args.address, args.gateway_token, tls_dir=args.tls_dir) as channel:
        earn = earn_client.simple_earn(channel)

        products = (await earn.ListProducts(se.ListProductsRequest(asset=args.asset), timeout=10)).products
        if not any(p.product_id == args.product for p in products):
            async with earn_client.connect_aio(args.address, args.operator_token, tls_dir=args.tls_dir) as operator_channel:
                created = await earn_client.simple_earn(operator_channel).CreateProduct(
                    se.CreateProductRequest(
                        # The same key with the same request answers the first creation again.
                        idempotency_key=f"example-create-{args.product}",
                        product_id=args.product,
                        asset=args.asset,
                        kind=se.PRODUCT_KIND_FLEXIBLE,
                        tiers=[accrual_pb2.RateTier(up_to="5", apr="0.08"), accrual_pb2.RateTier(up_to="", apr="0.03")],
                        min_subscription="0.001",
                        payout_cadence=se.PAYOUT_CADENCE_DAILY,
                    ),
                    timeout=10,
                )
            print(f"created: {created.product.product_id}")
            products = (await earn.ListProducts(se.ListProductsRequest(asset=args.asset), timeout=10)).products
        for product in products:
            tiers = ", ".join(f"{t.apr} up to {t.up_to or 'any'}" for t in product.tiers)
            print(f"product: {product.product_id} {product.asset} {se.ProductKind.Name(product.kind)} "
                  f"{se.ProductStatus.Name(product.status)} subscribed {product.subscribed or '0'} (APR {tiers})")

        subscribed = await earn.Subscribe(
            se.SubscribeRequest(
                idempotency_key=f"example-subscribe-{uuid.uuid4().hex}",  # one key per subscription
                user_id=args.user,
                product_id=args.product,
                amount=args.amount,
                auto_subscribe=True,
            ),
            timeout=10,
        )
        print(f"subscribed: {args.amount} {args.asset} to {args.product}: subscription {subscribed.subscription_id}, "
              f"position {subscribed.position.position_id}, accrues from unix hour {subscribed.accrues_from_hour}")

        positions = (await earn.ListPositions(se.ListPositionsRequest(user_id=args.user, page_size=100), timeout=10)).positions
        for position in positions:
            print(f"position: {position.position_id} {position.product_id} {position.principal} {position.asset} "
                  f"{se.PositionStatus.Name(position.status)} interest paid {position.interest_paid or '0'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="List Simple Earn products, subscribe a user, list the user's positions.")
    parser.add_argument("--address", default="127.0.0.1:50052", help="Simple Earn's gRPC address")
    parser.add_argument("--operator-token", default=os.environ.get("EARN_OPERATOR_TOKEN", "dev-operator"))
    parser.add_argument("--gateway-token", default=os.environ.get("EARN_GATEWAY_TOKEN", "dev-gateway"))
    parser.add_argument("--tls-dir", default=os.environ.get("EARN_TLS_DIR", ""),
                        help="the certificate directory (ca.pem, tool.pem, tool.key) when the services run mTLS")
    parser.add_argument("--user", default="alice")
    parser.add_argument("--product", default="example-btc-flex")
    parser.add_argument("--asset", default="BTC")
    parser.add_argument("--amount", default="0.1")
    args = parser.parse_args(argv)
    try:
        asyncio.run(run(args))
    except grpc.RpcError as err:  # e.g. FAILED_PRECONDITION when the user lacks the funds
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
