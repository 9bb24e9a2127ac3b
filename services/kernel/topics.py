"""The topic catalogue: every Kafka topic of the platform, declared once.

``ensure_topics`` creates what is missing at start-up (idempotently) and checks that
what exists has the declared partition count. Names get ``Settings.topic_prefix``, so a
test run can use its own fresh set of topics on a shared broker.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

from services.kernel.config import Settings

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int  # -1: keep forever
    compacted: bool = False
    max_message_bytes: int = 8 * 1024 * 1024
    min_compaction_lag_ms: int | None = None

    def configs(self) -> dict[str, str]:
        configs = {
            "cleanup.policy": "compact" if self.compacted else "delete",
            "retention.ms": str(self.retention_ms),
            "max.message.bytes": str(self.max_message_bytes),
        }
        if self.min_compaction_lag_ms is not None:
            configs["min.compaction.lag.ms"] = str(self.min_compaction_lag_ms)
        return configs


CATALOGUE: dict[str, TopicSpec] = {
    spec.name: spec
    for spec in (
        # One event per wallet posting (transfer, batch, hold change, deposit, withdrawal).
        TopicSpec("wallet.transfers", partitions=6, retention_ms=30 * DAY_MS),
        # The accrual engine's input from Simple Earn: position changes keyed by position,
        # rate changes, hour ticks and payout requests in every partition. Kept forever:
        # the engine's state is derived from it and can be rebuilt by replaying it.
        TopicSpec("simple_earn.accrual", partitions=6, retention_ms=-1),
        # The engine's payout results, in deterministic batches.
        TopicSpec("accrual.payouts", partitions=6, retention_ms=30 * DAY_MS),
        # Launchpool's engine input: pool schedules and stake changes keyed by pool, hour
        # ticks and payout requests in every partition. Kept forever, like the other input.
        TopicSpec("launchpool.accrual", partitions=6, retention_ms=-1),
        # The engine's Launchpool payout batches (PayoutBatch: pool id, stake ids).
        TopicSpec("launchpool.payouts", partitions=6, retention_ms=30 * DAY_MS),
        # The exchange core's facts (ExchangeEvent, exchange.proto), keyed by user id:
        # spot and futures fills, and deposits. CandyDrop counts tasks from them.
        TopicSpec("exchange.trades", partitions=6, retention_ms=7 * DAY_MS),
        TopicSpec("exchange.deposits", partitions=6, retention_ms=7 * DAY_MS),
        # Index prices per pair (PriceTick, key = pair), fed by the exchange, the simulator
        # or a CSV replay; the market service stores every tick, so a week is plenty.
        TopicSpec("market.prices", partitions=3, retention_ms=7 * DAY_MS),
        # Crypto Loan's engine input: loan states (LoanStateChanged, key = loan id), hour
        # starts in every partition, and the index ticks the engine copies from
        # market.prices into every partition. Kept forever, like the other engine inputs.
        TopicSpec("loan.ltv", partitions=6, retention_ms=-1),
        # The engine's margin calls, re-arms and liquidation triggers (LoanLtvAction, key = loan id).
        TopicSpec("loan.actions", partitions=6, retention_ms=30 * DAY_MS),
    )
}


def topic_name(settings: Settings, logical: str) -> str:
    """The physical name of a catalogue topic."""
    if logical not in CATALOGUE:
        raise KeyError(f"topic {logical!r} is not in the catalogue")
    return settings.topic_prefix + logical


class TopicNotReady(RuntimeError):
    pass


@retry(retry=retry_if_exception_type(TopicNotReady), wait=wait_fixed(0.2), stop=stop_after_delay(15), reraise=True)
def _check_partitions(admin: KafkaAdminClient, physical: str, expected: int) -> None:
    """A topic just created may be described with no partitions until its metadata has
    propagated: wait for it, then insist on the catalogue's count."""
    count = len(admin.describe_topics([physical])[0]["partitions"])
    if count == 0:
        raise TopicNotReady(f"topic {physical} has no partitions yet")
    if count != expected:
        raise RuntimeError(f"topic {physical} has {count} partitions; the catalogue says {expected}")


def ensure_topics(settings: Settings, names: list[str] | None = None, extra: Sequence[TopicSpec] = ()) -> list[str]:
    """Create the missing catalogue topics (all, or ``names``) and the ``extra`` ones
    (e.g. a faust app's changelogs); wait until their partitions are visible; return
    those created.

    Synchronous (kafka-python admin client): call it via ``asyncio.to_thread`` from
    async code.
    """
    specs = [CATALOGUE[n] for n in (names or list(CATALOGUE))] + list(extra)
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="earn-topics")
    try:
        existing = set(admin.list_topics())
        created: list[str] = []
        for spec in specs:
            physical = settings.topic_prefix + spec.name
            if physical in existing:
                continue
            try:
                admin.create_topics(
                    [NewTopic(physical, spec.partitions, 1, topic_configs=spec.configs())]
                )
                created.append(physical)
            except TopicAlreadyExistsError:
                pass  # another process won the race: fine
        for spec in specs:
            _check_partitions(admin, settings.topic_prefix + spec.name, spec.partitions)
        if created:
            log.info("topics created", extra={"topics": created})
        return created
    finally:
        admin.close()
