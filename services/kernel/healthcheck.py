"""`python -m services.kernel.healthcheck HOST:PORT [SERVICE]`: exit 0 when the process at
HOST:PORT answers SERVING on the standard gRPC health service, 1 otherwise.

The health check of the containers (docker-compose.yml, deploy/k8s): it dials through
:mod:`services.kernel.grpcclient`, so it speaks mTLS with the process's own certificate
when EARN_TLS_DIR is set (the kubelet's built-in gRPC probe and the plain
``grpc.insecure_channel`` cannot talk to a server that requires client certificates).
The health service is public (``grpcserver.PUBLIC_SERVICES``): any identity may ask.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kernel import grpcclient


def serving(address: str, service: str = "", timeout: float = 3.0) -> bool:
    """True when ``address`` reports SERVING for ``service`` ("" = the whole process)."""
    with grpcclient.sync_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            print(f"{address}: {err.code().name}: {err.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return False
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 2:
        print("usage: python -m services.kernel.healthcheck HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    return 0 if serving(*args) else 1


if __name__ == "__main__":
    raise SystemExit(main())
