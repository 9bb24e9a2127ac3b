"""The gRPC server base every service runs on (grpc.aio).

What it gives each service, so none writes it again:
- the standard health service and server reflection (both public);
- deny-by-default authorization: with mTLS on (``EARN_TLS_DIR``) a caller is identified by
  the common name of its client certificate, mapped to a role by ``IDENTITY_ROLES``
  (the ``tool`` identity names its role with a bearer token); with TLS off by a token in
  the ``authorization: Bearer <token>`` metadata. A role table per method says who may
  call it; a method missing from the table is refused;
- domain errors mapped to status codes with the domain's message; anything unexpected
  becomes INTERNAL without leaking details (the traceback goes to the log);
- Prometheus RED metrics with the standard names (go-grpc-prometheus convention);
- a /metrics endpoint, JSON logs, and graceful SIGTERM: health NOT_SERVING, drain
  in-flight calls, then the service's own shutdown hooks (relay, pools).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram, start_http_server

from services.kernel import tls
from services.kernel.config import ServiceSettings
from services.kernel.errors import DomainError, InvalidArgument
from services.kernel.ids import check_user_id

log = logging.getLogger(__name__)

STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server.", ["grpc_type", "grpc_service", "grpc_method"]
)
HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Response latency of RPCs handled by the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

PUBLIC_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})

# Roles. A role table maps "package.Service/Method" to the roles allowed to call it.
GATEWAY = "gateway"  # the exchange's API gateway, acting for the user named in a request
OPERATOR = "operator"  # back office and operator tools
SERVICE = "service"  # the platform's own services and jobs

RoleTable = Mapping[str, frozenset[str]]

# The identities that may hold a certificate (CN) and the role each one acts in: the one
# table for mTLS callers. Every process of the platform that calls another is a service;
# `tool` (grpcurl, load and benchmark drivers, the test suite, the demo's exchange
# generator) has no role of its own and names one with its bearer token, as without TLS.
TOOL = "tool"
SERVICE_IDENTITIES = (
    "wallet", "simple_earn", "launchpool", "candydrop", "market", "market_simulator", "dual",
    "leverage", "loan", "scheduler", "accrual", "relay", "hodler",
)
IDENTITY_ROLES: Mapping[str, str | None] = {
    GATEWAY: GATEWAY,
    OPERATOR: OPERATOR,
    **{name: SERVICE for name in SERVICE_IDENTITIES},
    TOOL: None,  # role from the bearer token
}


@dataclass(frozen=True, slots=True)
class Caller:
    role: str
    token_hint: str  # the token's first characters, for logs; never the token
    identity: str = ""  # the client certificate's CN with mTLS; empty without


_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def current_caller() -> Caller:
    caller = _caller.get()
    if caller is None:
        raise RuntimeError("no caller outside an RPC")
    return caller


def scoped_user(user_id: str) -> str:
    """The user a call is about: ``user_id`` checked when given; required when the gateway
    calls (it acts for one user); empty (every user) for operators and services."""
    if user_id:
        return check_user_id(user_id)
    if current_caller().role == GATEWAY:
        raise InvalidArgument("user_id", "is required for calls acting for a user")
    return ""


# The database went away (restart, crash, network): the request may be retried as it is.
_DATABASE_GONE: tuple[type[BaseException], ...] = (
    ConnectionError,  # refused or reset while the pool (re)connects
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.ConnectionDoesNotExistError,  # the connection was lost mid-query
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,  # the server is starting or in recovery
    # A pooled connection whose session the server ended mid-transaction can come back
    # from the pool with its protocol state broken ("cannot switch to state 15; another
    # operation (2) is in progress", asyncpg#784, sqlalchemy#13241): seen when the
    # postmaster was SIGKILLed under a ReleaseHold. A keyed retry is safe.
    asyncpg.exceptions.InternalClientError,
)


def database_unavailable(err: BaseException) -> bool:
    """True for a lost or refused database connection: the RPC answers UNAVAILABLE (retry
    with the same key) instead of INTERNAL, so a client does not take a PostgreSQL restart
    for a definitive failure. Writes are transactional and keyed, so a retry is safe."""
    if isinstance(err, asyncpg.InterfaceError) and "connection is closed" in str(err):
        return True  # e.g. "cannot call Transaction.__aexit__(): the underlying connection is closed"
    return isinstance(err, _DATABASE_GONE)


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


class _Interceptor(grpc.aio.ServerInterceptor):
    """Auth, error mapping, metrics, for every unary-unary method."""

    def __init__(self, roles: RoleTable, tokens: Mapping[str, str], *, mtls: bool = False) -> None:
        self.roles = roles
        self.tokens = tokens
        self.mtls = mtls

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service, method = _split(details.method)
        if handler is None or service in PUBLIC_SERVICES or not handler.unary_unary:
            return handler
        full = f"{service}/{method}"
        metadata = dict(details.invocation_metadata or ())
        inner = handler.unary_unary

        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
            STARTED.labels("unary", service, method).inc()
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                caller = self._authorize(full, metadata, _peer_identity(context) if self.mtls else None)
                token = _caller.set(caller)
                try:
                    return await inner(request, context)
                finally:
                    _caller.reset(token)
            except DomainError as err:
                code = grpc.StatusCode[err.code]
                await context.abort(code, err.message)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as err:
                if isinstance(err, grpc.aio.AbortError):
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                if database_unavailable(err):
                    code = grpc.StatusCode.UNAVAILABLE
                    log.warning("database unavailable", extra={"method": full, "error": repr(err)})
                    await context.abort(code, "the database is unavailable; retry with the same idempotency key")
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error", extra={"method": full})
                await context.abort(code, "internal error")
            finally:
                HANDLED.labels("unary", service, method, code.name).inc()
                HANDLING.labels("unary", service, method).observe(time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _authorize(self, method: str, metadata: Mapping[str, Any], identity: str | None = None) -> Caller:
        """The caller of ``method`` and whether it may call it. ``identity``: the client
        certificate's CN when the server runs mTLS (None without TLS)."""
        from services.kernel.errors import PermissionDenied, Unauthenticated

        value = metadata.get("authorization", "")
        token = value[7:] if isinstance(value, str) and value.startswith("Bearer ") else ""
        if identity is not None and identity != TOOL:
            if identity not in IDENTITY_ROLES:
                raise Unauthenticated(f"certificate identity {identity!r} is not known")
            role: str | None = IDENTITY_ROLES[identity]
            token = ""
        else:
            role = self.tokens.get(token)
            if role is None:
                raise Unauthenticated("authorization: a valid 'Bearer <token>' is required")
        allowed = self.roles.get(method)
        if not allowed or role not in allowed:
            raise PermissionDenied(f"role {role!r} may not call {method}")
        return Caller(role=role, token_hint=token[:4], identity=identity or "")


def _peer_identity(context: grpc.aio.ServicerContext) -> str:
    """The CN of the verified client certificate (the server requires one, so a call
    without it never gets here); empty if the transport gave none."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else ""


def server_credentials(settings: ServiceSettings, name: str) -> grpc.ServerCredentials | None:
    """mTLS server credentials (client certificates from the CA required) when
    ``settings.tls_dir`` is set; None for plaintext."""
    if not settings.tls_dir:
        return None
    creds = tls.load(settings.tls_dir, settings.tls_identity or name)
    return grpc.ssl_server_credentials([(creds.key, creds.cert)], root_certificates=creds.ca, require_client_auth=True)


class GrpcApp:
    """One service process: its servicers, its background tasks, its shutdown hooks."""

    def __init__(self, name: str, settings: ServiceSettings, roles: RoleTable) -> None:
        self.name = name
        self.settings = settings
        self.roles = roles
        self.server = grpc.aio.server(
            interceptors=[_Interceptor(roles, settings.token_roles(), mtls=bool(settings.tls_dir))],
            options=[("grpc.max_receive_message_length", 16 * 1024 * 1024), ("grpc.so_reuseport", 0)],
        )
        self.health = health.aio.HealthServicer()
        self._service_names: list[str] = []
        self._background: list[Callable[[], Awaitable[None]]] = []
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._stop = asyncio.Event()
        self.port: int | None = None

    def add_servicer(self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any, service_name: str) -> None:
        register(servicer, self.server)
        self._service_names.append(service_name)

    def background(self, task: Callable[[], Awaitable[None]]) -> None:
        """A coroutine that runs while the server runs (relay, consumers)."""
        self._background.append(task)

    def on_stop(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run at shutdown after the server drained, in reverse order of registration."""
        self._on_stop.append(hook)

    def request_stop(self) -> None:
        self._stop.set()

    async def start(self) -> int:
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        try:
            creds = server_credentials(self.settings, self.name)
            if creds is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, creds)
        except RuntimeError as err:
            raise SystemExit(f"{self.name}: cannot listen on {address} ({err}); set EARN_GRPC_PORT to a free port") from err
        await self.server.start()
        if self.settings.metrics_port:
            try:
                start_http_server(self.settings.metrics_port, addr=self.settings.grpc_host)
            except OSError as err:
                raise SystemExit(
                    f"{self.name}: cannot serve /metrics on port {self.settings.metrics_port} ({err}); set EARN_METRICS_PORT"
                ) from err
        for svc in self._service_names:
            await self._set_health(svc, serving=True)
        await self._set_health("", serving=True)
        log.info("serving", extra={"service": self.name, "grpc": f"{self.settings.grpc_host}:{self.port}",
                                   "metrics_port": self.settings.metrics_port, "mtls": bool(self.settings.tls_dir)})
        return self.port

    async def _set_health(self, service: str, *, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(service, status)

    async def serve_forever(self) -> None:
        """Start, run background tasks, wait for SIGTERM/SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        tasks = [asyncio.create_task(job(), name=f"{self.name}-bg-{i}") for i, job in enumerate(self._background)]
        stop_wait = asyncio.create_task(self._stop.wait())
        failed = False
        try:
            # A background task that dies is a broken process: stop rather than limp on.
            done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop_wait and task.exception() is not None:
                    failed = True
                    log.error("background task failed", exc_info=task.exception())
        finally:
            await self.shutdown(tasks)
        if failed:
            # Exit non-zero (70, EX_SOFTWARE) so a supervisor restarting on failure brings
            # the process back (exit 0 after losing the database looked like a clean stop).
            raise SystemExit(70)

    async def shutdown(self, tasks: list[asyncio.Task[None]] | None = None) -> None:
        """Health NOT_SERVING, drain calls, cancel background tasks, then the hooks.

        A background task cancelled mid-way loses nothing: each one commits its work
        transactionally (the relay deletes outbox rows only after Kafka acked them).
        """
        log.info("shutting down", extra={"service": self.name})
        for svc in [*self._service_names, ""]:
            await self._set_health(svc, serving=False)
        await self.server.stop(self.settings.grace_seconds)
        for task in tasks or []:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for hook in reversed(self._on_stop):
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        log.info("stopped", extra={"service": self.name})
