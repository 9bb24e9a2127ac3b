"""earn.v1.LaunchpoolService with earn-client: the projects with their reward pools, then a user's stakes.

Against `make run` (Launchpool on 127.0.0.1:50053, the dev tokens):

    python protos/python/examples/launchpool_example.py --user alice
    python protos/python/examples/launchpool_example.py --price BTC=60000 --price USDT=1   # with estimated APRs

Both calls are reads: the gateway role (acting for the user named in ListStakes), the
operator or a service may make them. The token defaults to $EARN_GATEWAY_TOKEN, then to
the dev token.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

import earn_client
from earn.v1 import launchpool_pb2 as lp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="List Launchpool projects and their pools, then the user's stakes.")
    parser.add_argument("--address", default="127.0.0.1:50053", help="Launchpool's gRPC address")
    parser.add_argument("--gateway-token", default=os.environ.get("EARN_GATEWAY_TOKEN", "dev-gateway"))
    parser.add_argument("--tls-dir", default=os.environ.get("EARN_TLS_DIR", ""),
                        help="the certificate directory (ca.pem, tool.pem, tool.key) when the services run mTLS")
    parser.add_argument("--user", default="alice")
    parser.add_argument("--price", action="append", default=[], metavar="ASSET=PRICE",
                        help="an asset's price in one quote asset (e.g. USDT), for the pools' estimated APR; repeatable")
    args = parser.parse_args(argv)
    prices = dict(p.split("=", 1) for p in args.price)
    try:
        with earn_client.connect(args.address, args.gateway_token, tls_dir=args.tls_dir) as channel:
            launchpool = earn_client.launchpool(channel)
            projects = launchpool.ListProjects(lp.ListProjectsRequest(prices=prices), timeout=10).projects
            stakes = launchpool.ListStakes(lp.ListStakesRequest(user_id=args.user, page_size=100), timeout=10).stakes
    except grpc.RpcError as err:  # the status code and the service's message
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    for project in projects:
        print(f"project: {project.project_id} {project.reward_asset} {lp.ProjectStatus.Name(project.status)} "
              f"{project.start_time.ToJsonString()} {project.end_time.ToJsonString()}")
        for pool in project.pools:
            print(f"pool: {pool.pool_id} {project.project_id} stake {pool.stake_asset} reward {pool.total_reward} "
                  f"staked {pool.total_staked or '0'} stakers {pool.stakers} APR {pool.estimated_apr or '-'}")
    for stake in stakes:
        print(f"stake: {stake.stake_id} {stake.pool_id} {stake.amount} {stake.stake_asset} "
              f"reward paid {stake.reward_paid or '0'} {stake.reward_asset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
