"""earn.v1.LoanService with earn-client: the loanable and collateral assets, then a user's loans.

Against `make run` (Crypto Loan on 127.0.0.1:50058, the dev tokens):

    python protos/python/examples/loan_example.py --user alice

Both calls are reads: the gateway role (acting for the user named in ListLoans), the
operator or a service may make them. The token defaults to $EARN_GATEWAY_TOKEN, then to
the dev token.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

import earn_client
from earn.v1 import loan_pb2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="List the loanable and collateral assets, then the user's loans.")
    parser.add_argument("--address", default="127.0.0.1:50058", help="Crypto Loan's gRPC address")
    parser.add_argument("--gateway-token", default=os.environ.get("EARN_GATEWAY_TOKEN", "dev-gateway"))
    parser.add_argument("--tls-dir", default=os.environ.get("EARN_TLS_DIR", ""),
                        help="the certificate directory (ca.pem, tool.pem, tool.key) when the services run mTLS")
    parser.add_argument("--user", default="alice")
    args = parser.parse_args(argv)
    try:
        with earn_client.connect(args.address, args.gateway_token, tls_dir=args.tls_dir) as channel:
            loan = earn_client.loan(channel)
            assets = loan.ListLoanAssets(loan_pb2.ListLoanAssetsRequest(), timeout=10)
            loans = loan.ListLoans(loan_pb2.ListLoansRequest(user_id=args.user, page_size=100), timeout=10).loans
    except grpc.RpcError as err:  # the status code and the service's message
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    for asset in assets.assets:
        print(f"asset: {asset.asset} hourly rate {asset.hourly_rate} borrow {asset.min_borrow}-{asset.max_borrow}")
    for collateral in assets.collateral:
        print(f"collateral: {collateral.asset} discount {collateral.discount}")
    for mine in loans:
        print(f"loan: {mine.loan_id} {mine.principal} {mine.loan_asset} interest {mine.interest or '0'} "
              f"LTV {mine.ltv} {loan_pb2.LoanStatus.Name(mine.status)} {loan_pb2.LoanTerm.Name(mine.term)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
