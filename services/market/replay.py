"""Replay a CSV price file onto market.prices: `python -m services.market.replay FILE`.

The file has a header and the columns ``time,pair,price`` and optionally ``source``:
time in ISO 8601 with an offset (``2026-11-26T07:30:00Z``), pair ``BASE/QUOTE``, price a
decimal string within the quote asset's scale. Every row is checked before anything is
published (a bad row names its line). Event ids are derived from the row (pair, time,
price, source), so replaying a file twice stores nothing twice. ``--speed N`` keeps the
file's time gaps divided by N; the default (0) publishes as fast as possible.
"""

from __future__ import annotations

import asyncio
import csv
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import typer
from aiokafka import AIOKafkaProducer

from services.kernel import topics
from services.kernel.clock import parse as parse_clock
from services.kernel.config import Settings, load
from services.kernel.errors import InvalidArgument
from services.kernel.money import format_amount
from services.market import domain
from services.market.simulator import TOPIC, tick_envelope

NAMESPACE = uuid.UUID("4f1b7a0e-53a4-4c55-9d1c-6a2f1f0d5e11")
app = typer.Typer(add_completion=False, help=__doc__)


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    pair: domain.Pair
    at_us: int
    price: Decimal
    source: str

    @property
    def event_id(self) -> uuid.UUID:
        return uuid.uuid5(NAMESPACE, f"{self.pair.name}|{self.at_us}|{format_amount(self.price)}|{self.source}")


def read(path: Path) -> list[Row]:
    rows: list[Row] = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"time", "pair", "price"} - set(reader.fieldnames or [])
        if missing:
            raise InvalidArgument("header", f"{path}: missing column(s) {', '.join(sorted(missing))} (time,pair,price[,source])")
        for record in reader:
            line = reader.line_num
            try:
                pair = domain.parse_pair(record["pair"] or "", f"line {line}: pair")
                price = domain.parse_price(record["price"] or "", pair, f"line {line}: price")
                try:
                    moment = parse_clock(record["time"] or "")
                except ValueError:
                    raise InvalidArgument(f"line {line}: time", f"{(record['time'] or '')[:40]!r} is not ISO 8601 with an offset") from None
                source = domain.check_source(record.get("source") or "replay", f"line {line}: source")
            except InvalidArgument:
                raise
            rows.append(Row(line, pair, domain.micros(moment), price, source))
    return sorted(rows, key=lambda r: (r.at_us, r.line))


async def publish(settings: Settings, rows: list[Row], speed: float = 0.0) -> int:
    await asyncio.to_thread(topics.ensure_topics, settings, [TOPIC])
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    topic = topics.topic_name(settings, TOPIC)
    try:
        started, first = time.monotonic(), rows[0].at_us if rows else 0
        for r in rows:
            if speed > 0:
                wait = (r.at_us - first) / domain.US / speed - (time.monotonic() - started)
                if wait > 0:
                    await asyncio.sleep(wait)
            raw = tick_envelope(r.pair, r.price, domain.from_micros(r.at_us), r.source, r.event_id)
            await producer.send(topic, raw, key=r.pair.name.encode())
        await producer.flush()
    finally:
        await producer.stop()
    return len(rows)


@app.command()
def main(path: Path = typer.Argument(..., exists=True, dir_okay=False), speed: float = typer.Option(0.0, "--speed", min=0.0)) -> None:
    """Publish every row of PATH to market.prices."""
    try:
        rows = read(path)
    except InvalidArgument as err:
        typer.echo(f"error: {err.message}", err=True)
        raise typer.Exit(2) from None
    count = asyncio.run(publish(load(Settings), rows, speed))
    typer.echo(f"published {count} ticks to {load(Settings).topic_prefix}{TOPIC}")


if __name__ == "__main__":
    app()
