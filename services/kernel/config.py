"""Typed settings from EARN_* environment variables: one object per process.

Every process builds exactly one settings object at start-up (``load(SettingsClass)``)
and passes it down; nothing else reads the environment.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from services.kernel.clock import Clock

REPO_ROOT = Path(__file__).resolve().parents[2]


class Settings(BaseSettings):
    """What every process needs: where PostgreSQL and Kafka are, logging, topic names."""

    model_config = SettingsConfigDict(env_prefix="EARN_", extra="ignore", frozen=True)

    data_dir: Path = REPO_ROOT / ".data"
    log_level: str = "INFO"

    pg_host: str = "127.0.0.1"
    pg_port: int = 15432
    pg_user: str = "postgres"
    pg_database: str = "earn"
    pg_pool_min: int = 2
    pg_pool_max: int = 10

    kafka_host: str = "127.0.0.1"
    kafka_port: int = 19092
    kafka_controller_port: int = 19093
    # Prefixed to every topic name of the catalogue; tests use a fresh prefix per run.
    topic_prefix: str = ""
    # A file holding the current time (ISO-8601 UTC) instead of the wall clock: for
    # end-to-end tests and demos only (services.kernel.clock).
    clock_file: Path | None = None
    # mTLS between processes (services.kernel.tls): the directory holding the CA and the
    # certificates; empty: plaintext with bearer tokens only (no certificates needed).
    tls_dir: str = ""
    # The certificate this process presents (<tls_dir>/<identity>.pem) as a client and as a
    # server; the caller's role is looked up from it (grpcserver.IDENTITY_ROLES). devstack
    # sets it to each process's name; empty: the process's service name for a gRPC server,
    # "tool" (role named by the bearer token) for anything else.
    tls_identity: str = ""

    @cached_property
    def clock(self) -> "Clock":
        from services.kernel.clock import Clock

        return Clock(self.clock_file)

    @cached_property
    def database_url(self) -> str:
        return f"postgresql://{self.pg_user}@{self.pg_host}:{self.pg_port}/{self.pg_database}"

    @cached_property
    def kafka_bootstrap(self) -> str:
        return f"{self.kafka_host}:{self.kafka_port}"


class ServiceSettings(Settings):
    """A gRPC service process."""

    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0  # each service sets its own default
    metrics_port: int = 0  # 0: no /metrics listener
    grace_seconds: float = 5.0
    # Service tokens accepted in `authorization: Bearer <token>` metadata, as
    # "token=role,token=role". The local defaults are for `make run` and tests only.
    auth_tokens: str = Field(
        default="dev-gateway=gateway,dev-operator=operator,dev-service=service"
    )
    # Run the outbox relay inside the service process (it can also run on its own).
    relay_enabled: bool = True

    def token_roles(self) -> dict[str, str]:
        pairs = (item.split("=", 1) for item in self.auth_tokens.split(",") if item.strip())
        return {token.strip(): role.strip() for token, role in pairs}


S = TypeVar("S", bound=Settings)


def load(cls: type[S], **overrides: object) -> S:
    return cls(**overrides)  # type: ignore[arg-type]
