"""earn.v1.HodlerService with earn-client: the airdrops, and what a user holds and may earn in each.

Against `make run` (HODLer on 127.0.0.1:50059, the dev tokens):

    python protos/python/examples/hodler_example.py --user alice

Both calls are reads: the gateway role, the operator or a service may make them. The
token defaults to $EARN_GATEWAY_TOKEN, then to the dev token. Hours are unix hours
(hours since 1970-01-01T00:00Z); an airdrop's window is [start, end).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

import earn_client
from earn.v1 import hodler_pb2 as hd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="List HODLer airdrops, then the user's holding and estimated reward in each.")
    parser.add_argument("--address", default="127.0.0.1:50059", help="HODLer's gRPC address")
    parser.add_argument("--gateway-token", default=os.environ.get("EARN_GATEWAY_TOKEN", "dev-gateway"))
    parser.add_argument("--tls-dir", default=os.environ.get("EARN_TLS_DIR", ""),
                        help="the certificate directory (ca.pem, tool.pem, tool.key) when the services run mTLS")
    parser.add_argument("--user", default="alice")
    args = parser.parse_args(argv)
    try:
        with earn_client.connect(args.address, args.gateway_token, tls_dir=args.tls_dir) as channel:
            hodler = earn_client.hodler(channel)
            airdrops = hodler.ListAirdrops(hd.ListAirdropsRequest(page_size=100), timeout=10).airdrops
            holdings = [
                hodler.GetUserHolding(hd.GetUserHoldingRequest(airdrop_id=a.airdrop_id, user_id=args.user), timeout=10)
                for a in airdrops
            ]
    except grpc.RpcError as err:  # the status code and the service's message
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    for airdrop in airdrops:
        print(f"airdrop: {airdrop.airdrop_id} hold {airdrop.hold_asset} reward {airdrop.total} {airdrop.reward_asset} "
              f"hours {airdrop.start_hour}-{airdrop.end_hour} {hd.AirdropStatus.Name(airdrop.status)} holders {airdrop.holders}")
    for holding in holdings:
        print(f"holding: {holding.airdrop_id} {holding.user_id} balance {holding.balance or '0'} "
              f"average {holding.projected_average or '0'} estimated reward {holding.estimated_reward or '0'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
