"""The event envelope: how every Kafka message of the platform is framed."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.message import Message

from earn.v1 import events_pb2

M = TypeVar("M", bound=Message)

SCHEMA_VERSION = 1


def wrap(
    payload: Message,
    *,
    key: str,
    producer: str,
    occurred_at: datetime,
    event_id: uuid.UUID | None = None,
    schema_version: int = SCHEMA_VERSION,
) -> events_pb2.EventEnvelope:
    env = events_pb2.EventEnvelope(
        event_id=str(event_id or uuid.uuid4()),
        type=payload.DESCRIPTOR.full_name,
        key=key,
        producer=producer,
        schema_version=schema_version,
        payload=payload.SerializeToString(deterministic=True),
    )
    env.occurred_at.FromDatetime(occurred_at.astimezone(UTC))
    return env


def parse(raw: bytes) -> events_pb2.EventEnvelope:
    env = events_pb2.EventEnvelope()
    env.ParseFromString(raw)
    return env


def unwrap(env: events_pb2.EventEnvelope, cls: type[M]) -> M:
    """The payload as ``cls``; refuses a type or schema version it does not know."""
    if env.type != cls.DESCRIPTOR.full_name:
        raise ValueError(f"event {env.event_id} is a {env.type}, not a {cls.DESCRIPTOR.full_name}")
    if env.schema_version > SCHEMA_VERSION:
        raise ValueError(f"event {env.event_id} has schema version {env.schema_version}; this build knows {SCHEMA_VERSION}")
    msg = cls()
    msg.ParseFromString(env.payload)
    return msg


def occurred_at(env: events_pb2.EventEnvelope) -> datetime:
    return env.occurred_at.ToDatetime(tzinfo=UTC)
