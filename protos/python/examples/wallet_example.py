"""earn.v1.WalletService with earn-client: a deposit, then the owner's balances.

Against `make run` (the wallet on 127.0.0.1:50051, the dev tokens):

    pip install build/dist/earn_client-*.whl      # `make client` builds it
    python protos/python/examples/wallet_example.py --owner alice --amount 1.5

Deposit needs the operator role, GetBalances the gateway role (or operator, service):
each call goes through a channel holding that role's token. Tokens default to
$EARN_OPERATOR_TOKEN / $EARN_GATEWAY_TOKEN, then to the dev tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid

import grpc

import earn_client
from earn.v1 import wallet_pb2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Deposit into a user's funding account, then list the user's balances.")
    parser.add_argument("--address", default="127.0.0.1:50051", help="the wallet's gRPC address")
    parser.add_argument("--operator-token", default=os.environ.get("EARN_OPERATOR_TOKEN", "dev-operator"))
    parser.add_argument("--gateway-token", default=os.environ.get("EARN_GATEWAY_TOKEN", "dev-gateway"))
    parser.add_argument("--tls-dir", default=os.environ.get("EARN_TLS_DIR", ""),
                        help="the certificate directory (ca.pem, tool.pem, tool.key) when the services run mTLS")
    parser.add_argument("--owner", default="alice")
    parser.add_argument("--asset", default="BTC")
    parser.add_argument("--amount", default="1.5", help="a plain decimal, at most the asset's scale")
    args = parser.parse_args(argv)

    # Every write carries an idempotency key: a retry with the same key (and the same
    # request) returns the first answer instead of depositing twice. One key per deposit.
    deposit = wallet_pb2.DepositRequest(
        idempotency_key=f"example-deposit-{uuid.uuid4().hex}",
        owner=args.owner,
        asset=args.asset,
        amount=args.amount,
        reference="earn-client wallet example",
    )
    try:
        with earn_client.connect(args.address, args.operator_token, tls_dir=args.tls_dir) as channel:
            transfer = earn_client.wallet(channel).Deposit(deposit, timeout=10).transfer
        print(f"deposit: transfer {transfer.transfer_id}, {transfer.amount} {transfer.asset} "
              f"{transfer.source.owner}/{wallet_pb2.AccountKind.Name(transfer.source.kind)} -> "
              f"{transfer.destination.owner}/{wallet_pb2.AccountKind.Name(transfer.destination.kind)}")

        with earn_client.connect(args.address, args.gateway_token, tls_dir=args.tls_dir) as channel:
            reply = earn_client.wallet(channel).GetBalances(wallet_pb2.GetBalancesRequest(owner=args.owner), timeout=10)
    except grpc.RpcError as err:  # the status code and the service's message, e.g. INVALID_ARGUMENT: amount: ...
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    for balance in reply.balances:
        print(f"balance: {balance.owner} {balance.asset} {wallet_pb2.AccountKind.Name(balance.kind)} {balance.balance}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
