"""Market metrics. Labels are pairs (of known assets: bounded) and outcomes."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

TICKS = Counter("earn_market_ticks_total", "Price ticks received, by outcome: stored, duplicate.", ["pair", "outcome"])
DEAD_LETTERS = Counter("earn_market_dead_letters_total", "Records of market.prices parked as unreadable.", [])
LAST_TICK = Gauge("earn_market_last_tick_timestamp_seconds", "Event time of the newest tick stored, per pair.", ["pair"])
TWAP_REFUSED = Counter("earn_market_twap_refused_total", "GetTwap calls refused for missing data, per pair.", ["pair"])
