"""earn.v1.CandyDropService with earn-client: the campaigns with their tasks, and a user's progress in each.

Against `make run` (CandyDrop on 127.0.0.1:50054, the dev tokens):

    python protos/python/examples/candydrop_example.py --user alice

Both calls are reads: the gateway role, the operator or a service may make them. The
token defaults to $EARN_GATEWAY_TOKEN, then to the dev token.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

import earn_client
from earn.v1 import candydrop_pb2 as cd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="List CandyDrop campaigns and their tasks, then the user's progress in each.")
    parser.add_argument("--address", default="127.0.0.1:50054", help="CandyDrop's gRPC address")
    parser.add_argument("--gateway-token", default=os.environ.get("EARN_GATEWAY_TOKEN", "dev-gateway"))
    parser.add_argument("--tls-dir", default=os.environ.get("EARN_TLS_DIR", ""),
                        help="the certificate directory (ca.pem, tool.pem, tool.key) when the services run mTLS")
    parser.add_argument("--user", default="alice")
    args = parser.parse_args(argv)
    try:
        with earn_client.connect(args.address, args.gateway_token, tls_dir=args.tls_dir) as channel:
            candydrop = earn_client.candydrop(channel)
            campaigns = candydrop.ListCampaigns(cd.ListCampaignsRequest(page_size=100), timeout=10).campaigns
            progress = [
                candydrop.GetProgress(cd.GetProgressRequest(campaign_id=c.campaign_id, user_id=args.user), timeout=10)
                for c in campaigns
            ]
    except grpc.RpcError as err:  # the status code and the service's message
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    for campaign in campaigns:
        print(f"campaign: {campaign.campaign_id} {campaign.prize_pool} {campaign.prize_asset} "
              f"{cd.PrizePoolKind.Name(campaign.pool_kind)} {cd.CampaignStatus.Name(campaign.status)} "
              f"participants {campaign.participants} candies {campaign.total_candies}")
        for task in campaign.tasks:
            print(f"task: {campaign.campaign_id} {task.task_id} {cd.CandyTaskKind.Name(task.kind)} {task.threshold} {task.asset} "
                  f"candies {task.candies} up to {task.max_completions} times")
    for mine in progress:
        print(f"progress: {mine.campaign_id} {mine.user_id} {'registered' if mine.registered else 'not-registered'} "
              f"candies {mine.candies} estimated prize {mine.estimated_prize or '0'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
