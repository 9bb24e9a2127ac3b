"""earn.v1.DualService with earn-client: the Dual Investment plans, then a user's subscriptions.

Against `make run` (Dual Investment on 127.0.0.1:50056, the dev tokens):

    python protos/python/examples/dual_example.py --user alice --base BTC --quote USDT

Both calls are reads: the gateway role (acting for the user named in
ListDualSubscriptions), the operator or a service may make them. The token defaults to
$EARN_GATEWAY_TOKEN, then to the dev token.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

import earn_client
from earn.v1 import dual_pb2 as du


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="List Dual Investment plans, then the user's subscriptions.")
    parser.add_argument("--address", default="127.0.0.1:50056", help="Dual Investment's gRPC address")
    parser.add_argument("--gateway-token", default=os.environ.get("EARN_GATEWAY_TOKEN", "dev-gateway"))
    parser.add_argument("--tls-dir", default=os.environ.get("EARN_TLS_DIR", ""),
                        help="the certificate directory (ca.pem, tool.pem, tool.key) when the services run mTLS")
    parser.add_argument("--user", default="alice")
    parser.add_argument("--base", default="", help="only plans of this base asset (default: all)")
    parser.add_argument("--quote", default="", help="only plans of this quote asset (default: all)")
    args = parser.parse_args(argv)
    try:
        with earn_client.connect(args.address, args.gateway_token, tls_dir=args.tls_dir) as channel:
            dual = earn_client.dual(channel)
            plans = dual.ListDualPlans(du.ListDualPlansRequest(base_asset=args.base, quote_asset=args.quote), timeout=10).plans
            subscriptions = dual.ListDualSubscriptions(
                du.ListDualSubscriptionsRequest(user_id=args.user, page_size=100), timeout=10
            ).subscriptions
    except grpc.RpcError as err:  # the status code and the service's message
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    for plan in plans:
        print(f"plan: {plan.plan_id} {plan.base_asset}/{plan.quote_asset} {du.DualDirection.Name(plan.direction)} "
              f"strike {plan.strike} APR {plan.apr} settles {plan.settlement_time.ToJsonString()} "
              f"{du.DualPlanStatus.Name(plan.status)} left {plan.left_quota or '-'} {plan.invest_asset}")
    for sub in subscriptions:
        print(f"subscription: {sub.subscription_id} {sub.plan_id} {sub.amount} {sub.invest_asset} "
              f"{du.DualSubscriptionStatus.Name(sub.status)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
