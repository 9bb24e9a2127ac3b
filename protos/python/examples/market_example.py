"""earn.v1.MarketService with earn-client: the latest index price of each pair.

Against `make run` (the market on 127.0.0.1:50055, fed by the market simulator; the dev tokens):

    python protos/python/examples/market_example.py --pair BTC/USDT --pair ETH/USDT

GetIndex is a read: the gateway role, the operator or a service may call it. A pair
without a price yet answers NOT_FOUND, shown as `none`. The token defaults to
$EARN_GATEWAY_TOKEN, then to the dev token.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

import earn_client
from earn.v1 import market_pb2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the latest index price of each pair.")
    parser.add_argument("--address", default="127.0.0.1:50055", help="the market's gRPC address")
    parser.add_argument("--gateway-token", default=os.environ.get("EARN_GATEWAY_TOKEN", "dev-gateway"))
    parser.add_argument("--tls-dir", default=os.environ.get("EARN_TLS_DIR", ""),
                        help="the certificate directory (ca.pem, tool.pem, tool.key) when the services run mTLS")
    parser.add_argument("--pair", action="append", help="BASE/QUOTE; repeatable (default BTC/USDT)")
    args = parser.parse_args(argv)
    try:
        with earn_client.connect(args.address, args.gateway_token, tls_dir=args.tls_dir) as channel:
            market = earn_client.market(channel)
            for pair in args.pair or ["BTC/USDT"]:
                try:
                    index = market.GetIndex(market_pb2.GetIndexRequest(pair=pair), timeout=10)
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    print(f"index: {pair} none")
                    continue
                print(f"index: {index.pair} {index.price} {index.event_time.ToJsonString()} {index.source}")
    except grpc.RpcError as err:  # the status code and the service's message, e.g. INVALID_ARGUMENT: pair: ...
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
