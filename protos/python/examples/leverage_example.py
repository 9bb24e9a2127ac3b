"""earn.v1.LeverageService with earn-client: the Smart Leverage products, then a user's positions.

Against `make run` (Smart Leverage on 127.0.0.1:50057, the dev tokens):

    python protos/python/examples/leverage_example.py --user alice --pair BTC/USDT

Both calls are reads: the gateway role (acting for the user named in
ListLeveragePositions), the operator or a service may make them. A position is opened by
RequestLeverageQuote then SubscribeLeverage (gateway, with the quote's id). The token
defaults to $EARN_GATEWAY_TOKEN, then to the dev token.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

import earn_client
from earn.v1 import leverage_pb2 as lv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="List Smart Leverage products, then the user's positions.")
    parser.add_argument("--address", default="127.0.0.1:50057", help="Smart Leverage's gRPC address")
    parser.add_argument("--gateway-token", default=os.environ.get("EARN_GATEWAY_TOKEN", "dev-gateway"))
    parser.add_argument("--tls-dir", default=os.environ.get("EARN_TLS_DIR", ""),
                        help="the certificate directory (ca.pem, tool.pem, tool.key) when the services run mTLS")
    parser.add_argument("--user", default="alice")
    parser.add_argument("--pair", default="", help="only products of this pair (default: all)")
    args = parser.parse_args(argv)
    try:
        with earn_client.connect(args.address, args.gateway_token, tls_dir=args.tls_dir) as channel:
            leverage = earn_client.leverage(channel)
            products = leverage.ListLeverageProducts(lv.ListLeverageProductsRequest(pair=args.pair), timeout=10).products
            positions = leverage.ListLeveragePositions(
                lv.ListLeveragePositionsRequest(user_id=args.user, page_size=100), timeout=10
            ).positions
    except grpc.RpcError as err:  # the status code and the service's message
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    for product in products:
        print(f"product: {product.product_id} {product.pair} max leverage {product.max_leverage} fee {product.fee_rate} "
              f"principal {product.min_principal}-{product.max_principal} up to {product.max_term_hours} hours")
    for position in positions:
        print(f"position: {position.position_id} {position.product_id} {lv.LeverageDirection.Name(position.direction)} "
              f"{position.leverage}x {position.principal} entry {position.entry_price} "
              f"{lv.LeveragePositionStatus.Name(position.status)} matures {position.maturity.ToJsonString()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
