"""Writes the Grafana dashboards of the platform: deploy/grafana/dashboards/*.json.

`.venv/bin/python deploy/grafana/generate.py` after a change here; the suite fails when
the JSON files and this script disagree (tests/deploy/test_grafana.py), and checks every
query against a live stack (tests/integration/test_observability.py).

Queries use only metrics the code exports and only bounded labels (job, instance,
grpc_service, grpc_method, grpc_code, schema, partition, type, reason, product, asset,
outcome, job_name, status, pool, pair, topic, direction, underlying, kind, band): never a user,
a position, a campaign or an account. The scheduler's
`job_name` label is its metrics' `job` label renamed at scrape time (prometheus.yml).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards"

# The datasource provisioned in provisioning/datasources/prometheus.yml.
DATASOURCE = {"type": "prometheus", "uid": "earn-prometheus"}
SCHEMA_VERSION = 39  # Grafana 11.x loads it as is
R = "$__rate_interval"
PROCESSES = 'job=~"wallet|simple_earn|launchpool|candydrop|hodler|market|dual|leverage|loan|accrual|scheduler"'
SERVER_ERRORS = 'grpc_code=~"UNKNOWN|INTERNAL|UNAVAILABLE|DATA_LOSS|DEADLINE_EXCEEDED"'


def error_ratio(selector: str, by: str) -> str:
    """Server-error share of calls; 0 (not "no data") for methods without server faults."""
    sel = f"{selector}, " if selector else ""
    return (
        f"(sum by ({by}) (rate(grpc_server_handled_total{{{sel}{SERVER_ERRORS}}}[{R}]))"
        f" or sum by ({by}) (rate(grpc_server_handled_total{{{selector}}}[{R}])) * 0)"
        f" / sum by ({by}) (rate(grpc_server_handled_total{{{selector}}}[{R}]))"
    )


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    tags: list[str]
    variables: list[dict[str, Any]] = field(default_factory=list)
    panels: list[dict[str, Any]] = field(default_factory=list)
    _next_id: int = 1
    _x: int = 0
    _y: int = 0
    _row_height: int = 0

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _place(self, width: int, height: int) -> dict[str, int]:
        if self._x + width > 24:
            self._x, self._y, self._row_height = 0, self._y + self._row_height, 0
        pos = {"h": height, "w": width, "x": self._x, "y": self._y}
        self._x += width
        self._row_height = max(self._row_height, height)
        return pos

    def row(self, title: str) -> None:
        self._x, self._y, self._row_height = 0, self._y + self._row_height, 0
        self.panels.append({
            "id": self._id(), "type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": self._place(24, 1),
        })
        self._x, self._y, self._row_height = 0, self._y + 1, 0

    def _targets(self, queries: list[tuple[str, str]], heatmap: bool = False) -> list[dict[str, Any]]:
        return [
            {
                "refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
                "range": True, "instant": False, **({"format": "heatmap"} if heatmap else {}),
            }
            for i, (expr, legend) in enumerate(queries)
        ]

    def timeseries(
        self, title: str, description: str, queries: list[tuple[str, str]], unit: str = "short",
        *, width: int = 12, height: int = 8, stack: bool = False,
    ) -> None:
        self.panels.append({
            "id": self._id(), "type": "timeseries", "title": title, "description": description,
            "datasource": DATASOURCE, "gridPos": self._place(width, height),
            "targets": self._targets(queries),
            "fieldConfig": {
                "defaults": {
                    "unit": unit,
                    "custom": {
                        "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                        "spanNulls": False, "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                    },
                },
                "overrides": [],
            },
            "options": {
                "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True, "calcs": ["lastNotNull", "max"]},
                "tooltip": {"mode": "multi", "sort": "desc"},
            },
        })

    def per_hour(
        self, title: str, description: str, metric: str, by: str, legend: str,
        *, width: int, height: int = 8, window: str = "1h", selector: str = "",
    ) -> None:
        """A counter's increase over ``window`` (an amount or a count per hour) of the series
        matching ``selector``, summed by the labels ``by`` (none: one line)."""
        sel = f"{{{selector}}}" if selector else ""
        grouped = f" by ({by}) " if by else ""
        self.timeseries(title, description, [(f"sum{grouped}(increase({metric}{sel}[{window}]))", legend)], width=width, height=height)

    def stat(
        self, title: str, description: str, queries: list[tuple[str, str]], unit: str = "short",
        *, width: int = 6, height: int = 4, steps: list[tuple[str, float | None]] | None = None,
        mappings: list[dict[str, Any]] | None = None,
    ) -> None:
        steps = steps or [("green", None)]
        self.panels.append({
            "id": self._id(), "type": "stat", "title": title, "description": description,
            "datasource": DATASOURCE, "gridPos": self._place(width, height),
            "targets": self._targets(queries),
            "fieldConfig": {
                "defaults": {
                    "unit": unit, "mappings": mappings or [],
                    "thresholds": {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]},
                },
                "overrides": [],
            },
            "options": {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "background", "graphMode": "none", "textMode": "value_and_name",
                "orientation": "auto", "justifyMode": "auto",
            },
        })

    def heatmap(self, title: str, description: str, expr: str, *, width: int = 12, height: int = 8) -> None:
        self.panels.append({
            "id": self._id(), "type": "heatmap", "title": title, "description": description,
            "datasource": DATASOURCE, "gridPos": self._place(width, height),
            "targets": self._targets([(expr, "{{le}}")], heatmap=True),
            "fieldConfig": {"defaults": {"unit": "s"}, "overrides": []},
            "options": {
                "calculate": False, "yAxis": {"unit": "s"}, "cellGap": 1,
                "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                "tooltip": {"mode": "single", "yHistogram": True},
            },
        })

    def model(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": self.tags,
            "timezone": "utc",
            "editable": False,
            "graphTooltip": 1,
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "timepicker": {},
            "fiscalYearStartMonth": 0,
            "liveNow": False,
            "weekStart": "",
            "links": [{
                "type": "dashboards", "title": "Earn dashboards", "tags": ["earn"], "asDropdown": True,
                "includeVars": False, "keepTime": True, "targetBlank": False, "icon": "external link", "tooltip": "", "url": "",
            }],
            "annotations": {"list": [{
                "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
                "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
            }]},
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


UP_MAPPINGS = [{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"}, "1": {"text": "UP", "color": "green"}}}]


def grpc_section(d: Dashboard, service: str) -> None:
    """RED of one gRPC service, per method, from the standard metric names."""
    s = f'grpc_service="{service}"'
    d.row(f"gRPC {service}: rate, errors, duration")
    d.timeseries("Requests by method", "Calls completed per second.",
                 [(f"sum by (grpc_method) (rate(grpc_server_handled_total{{{s}}}[{R}]))", "{{grpc_method}}")], "reqps")
    d.timeseries("Server error ratio by method", "Share of calls ending INTERNAL, UNKNOWN, UNAVAILABLE, DATA_LOSS or DEADLINE_EXCEEDED.",
                 [(error_ratio(s, "grpc_method"), "{{grpc_method}}")], "percentunit")
    d.timeseries("Responses by code", "Every status, the caller's mistakes (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, UNAUTHENTICATED) included.",
                 [(f"sum by (grpc_code) (rate(grpc_server_handled_total{{{s}}}[{R}]))", "{{grpc_code}}")], "reqps", stack=True)
    d.timeseries("Latency p50 and p99 by method", "From the grpc_server_handling_seconds histogram.", [
        (f"histogram_quantile(0.5, sum by (grpc_method, le) (rate(grpc_server_handling_seconds_bucket{{{s}}}[{R}])))", "p50 {{grpc_method}}"),
        (f"histogram_quantile(0.99, sum by (grpc_method, le) (rate(grpc_server_handling_seconds_bucket{{{s}}}[{R}])))", "p99 {{grpc_method}}"),
    ], "s")


def outbox_section(d: Dashboard, schema: str, job: str) -> None:
    d.row(f"Outbox of schema {schema}")
    d.timeseries("Backlog", "Events committed and not yet acknowledged by Kafka (the active relay's count).",
                 [(f'max(earn_outbox_backlog{{schema="{schema}"}})', "waiting")], width=8)
    d.timeseries("Published", "Events the relay published per second.",
                 [(f'sum(rate(earn_outbox_published_total{{schema="{schema}"}}[{R}]))', "published")], "ops", width=8)
    d.timeseries("Publish errors", "Failed publish attempts of the relay per second (Kafka unreachable, send failed).",
                 [(f'sum(rate(earn_outbox_publish_errors_total{{job="{job}", schema="{schema}"}}[{R}]))', "errors")], "ops", width=8)


def process_section(d: Dashboard, job: str) -> None:
    d.row(f"Processes ({job})")
    d.stat("Instances up", "Scrape targets of the job that answer.", [(f'sum(up{{job="{job}"}})', "up")], width=4, height=8,
           steps=[("red", None), ("green", 1)])
    d.timeseries("CPU", "CPU seconds per second, per instance.",
                 [(f'rate(process_cpu_seconds_total{{job="{job}"}}[{R}])', "{{instance}}")], "short", width=10)
    d.timeseries("Resident memory", "Per instance.", [(f'process_resident_memory_bytes{{job="{job}"}}', "{{instance}}")], "bytes", width=10)


def settlement_failures(d: Dashboard, job: str) -> None:
    """The failed attempts of a settlement job that pays at the market's TWAP (Dual, Leverage)."""
    d.per_hour("Failed settlement attempts per hour", "By reason: prices (no TWAP for the window), wallet (alert EarnSettlementFailing).",
               f"earn_{job}_settlement_failures_total", "reason", "{{reason}}", width=12)


def overview() -> Dashboard:
    d = Dashboard("earn-overview", "Earn platform: overview",
                  "Every process: up, gRPC RED per method, outbox backlogs, the accrual engine's lag, the jobs' last success.",
                  ["earn", "overview"])
    d.row("Processes")
    d.stat("Targets", "Every scrape target of the platform, UP or DOWN.",
           [(f"up{{{PROCESSES}}}", "{{job}} {{instance}}")], width=24, steps=[("red", None), ("green", 1)], mappings=UP_MAPPINGS)
    d.row("gRPC: rate, errors, duration (every service)")
    by = "grpc_service, grpc_method"
    d.timeseries("Requests by method", "Calls completed per second.",
                 [(f"sum by ({by}) (rate(grpc_server_handled_total[{R}]))", "{{grpc_service}}/{{grpc_method}}")], "reqps")
    d.timeseries("Server error ratio by method", "Share of calls ending INTERNAL, UNKNOWN, UNAVAILABLE, DATA_LOSS or DEADLINE_EXCEEDED.",
                 [(error_ratio("", by), "{{grpc_service}}/{{grpc_method}}")], "percentunit")
    d.timeseries("p99 latency by method", "From the grpc_server_handling_seconds histogram.",
                 [(f"histogram_quantile(0.99, sum by ({by}, le) (rate(grpc_server_handling_seconds_bucket[{R}])))", "{{grpc_service}}/{{grpc_method}}")], "s")
    d.timeseries("Responses by code", "Every status, the caller's mistakes included.",
                 [(f"sum by (grpc_code) (rate(grpc_server_handled_total[{R}]))", "{{grpc_code}}")], "reqps", stack=True)
    d.timeseries("Calls in flight", "Started and not yet completed, per service.", [(
        "sum by (grpc_service) (sum by (job, instance, grpc_service) (grpc_server_started_total)"
        " - sum by (job, instance, grpc_service) (grpc_server_handled_total))", "{{grpc_service}}")], width=24, height=6)
    d.row("Events: outbox backlog and consumer lag")
    d.timeseries("Outbox backlog by schema", "Events committed and not yet acknowledged by Kafka.",
                 [("max by (schema) (earn_outbox_backlog)", "{{schema}}")], width=8)
    d.timeseries("Outbox published by schema", "Events published per second.",
                 [(f"sum by (schema) (rate(earn_outbox_published_total[{R}]))", "{{schema}}")], "ops", width=8)
    d.timeseries("Accrual engine lag by partition", "Input messages of simple_earn.accrual not yet processed (as of the last one processed).",
                 [("max by (partition) (earn_accrual_consumer_lag)", "partition {{partition}}")], width=8)
    d.timeseries("Launchpool engine lag by partition", "Input messages of launchpool.accrual not yet processed (as of the last one processed).",
                 [("max by (partition) (earn_accrual_launchpool_consumer_lag)", "partition {{partition}}")], width=12)
    d.timeseries("Market: age of the newest price by pair", "Since the event time of the newest tick stored (alert EarnMarketPricesStale over 5 minutes).",
                 [("time() - max by (pair) (earn_market_last_tick_timestamp_seconds)", "{{pair}}")], "s", width=12)
    d.row("Products: money in and out per hour (units of each asset)")
    d.timeseries("Subscribed and staked per hour", "Simple Earn, Dual Investment and Smart Leverage subscriptions, Launchpool stakes.", [
        ("sum by (asset) (increase(earn_simple_earn_subscribed_total[1h]))", "Simple Earn {{asset}}"),
        ("sum by (asset) (increase(earn_launchpool_staked_total[1h]))", "Launchpool {{asset}}"),
        ("sum by (asset) (increase(earn_dual_subscribed_total[1h]))", "Dual {{asset}}"),
        ("sum by (asset) (increase(earn_leverage_subscribed_total[1h]))", "Leverage {{asset}}"),
    ], width=12)
    d.timeseries("Paid per hour", "Interest, rewards, prizes, settlements and early redemptions paid to users.", [
        ("sum by (asset) (increase(earn_simple_earn_interest_paid_total[1h]))", "Simple Earn {{asset}}"),
        ("sum by (asset) (increase(earn_launchpool_rewards_paid_total[1h]))", "Launchpool {{asset}}"),
        ("sum by (asset) (increase(earn_candydrop_prizes_paid_total[1h]))", "CandyDrop {{asset}}"),
        ("sum by (asset) (increase(earn_hodler_rewards_paid_total[1h]))", "HODLer {{asset}}"),
        ("sum by (asset) (increase(earn_dual_paid_total[1h]))", "Dual {{asset}}"),
        ("sum by (asset) (increase(earn_leverage_paid_total[1h]))", "Leverage {{asset}}"),
    ], width=12)
    d.row("Jobs")
    d.stat("Since last success", "Per job; hourly jobs should stay under an hour, the daily one under a day.",
           [("time() - max by (job_name) (earn_job_last_success_timestamp_seconds)", "{{job_name}}")], "s", width=24)
    return d


def wallet() -> Dashboard:
    d = Dashboard("earn-wallet", "Earn platform: wallet",
                  "The funding ledger: its gRPC methods, its outbox, its processes.", ["earn", "wallet"])
    grpc_section(d, "earn.v1.WalletService")
    d.heatmap("Latency distribution", "Every wallet call, by duration bucket.",
              f'sum by (le) (rate(grpc_server_handling_seconds_bucket{{grpc_service="earn.v1.WalletService"}}[{R}]))', width=24)
    d.row("Bulk credits (payouts in columns)")
    d.timeseries("Waiting to be folded", "Credits committed (they count in every balance) and not yet written to the"
                 " transfers history by the folder.", [("max(earn_wallet_bulk_credits_unfolded)", "credits")], width=12)
    d.timeseries("Folded", "Credits the folders write to the history per second.",
                 [(f"sum(rate(earn_wallet_bulk_credits_folded_total[{R}]))", "credits")], "ops", width=12)
    outbox_section(d, "wallet", "wallet")
    process_section(d, "wallet")
    return d


def simple_earn() -> Dashboard:
    product_var = {
        "name": "product", "label": "Product", "type": "query", "datasource": DATASOURCE,
        "definition": "label_values(earn_simple_earn_positions_open, product)",
        "query": {"query": "label_values(earn_simple_earn_positions_open, product)", "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "regex": "", "sort": 1, "hide": 0,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [],
    }
    d = Dashboard("earn-simple-earn", "Earn platform: Simple Earn",
                  "Flexible and fixed-term savings: money in and out per product and asset, payouts, its gRPC methods and outbox.",
                  ["earn", "simple_earn"], variables=[product_var])
    p = 'product=~"$product"'
    d.row("Money per product (units of the asset)")
    d.per_hour("Subscribed per hour", "User subscriptions, auto-subscribe reinvestments and auto-renewals.",
               "earn_simple_earn_subscribed_total", "product, asset", "{{product}} ({{asset}})", width=8, selector=p)
    d.per_hour("Redeemed per hour", "Principal returned: user redemptions and maturities.",
               "earn_simple_earn_redeemed_total", "product, asset", "{{product}} ({{asset}})", width=8, selector=p)
    d.per_hour("Interest paid per hour", "Flexible payouts and fixed-term interest at maturity.",
               "earn_simple_earn_interest_paid_total", "product, asset", "{{product}} ({{asset}})", width=8, selector=p)
    d.timeseries("Open positions", "Active positions per product.",
                 [(f"sum by (product) (earn_simple_earn_positions_open{{{p}}})", "{{product}}")], width=6)
    d.per_hour("Payout batches per hour by outcome", "Accrual engine batches consumed: paid, duplicate (a redelivery, harmless), dead_letter.",
               "earn_simple_earn_payout_batches_total", "outcome", "{{outcome}}", width=6)
    d.timeseries("Payout batch apply time (p50, p99 over 1 h)", "One PayoutBatch checked, recorded and credited in the wallet, retries included.", [
        ("histogram_quantile(0.5, sum by (le) (increase(earn_simple_earn_payout_batch_seconds_bucket[1h])))", "p50"),
        ("histogram_quantile(0.99, sum by (le) (increase(earn_simple_earn_payout_batch_seconds_bucket[1h])))", "p99"),
    ], "s", width=6)
    d.per_hour("Dead letters per hour by reason", "Payout records parked for an operator: unreadable, or items_skipped (paid in part).",
               "earn_simple_earn_dead_letters_total", "reason", "{{reason}}", width=6)
    d.timeseries("Writes per record batch (p50, p99 over 5 m)", "Group commit: one product's Subscribes (or Redeems) recorded in one transaction; 1 when idle.", [
        (f"histogram_quantile({q}, sum by (le) (rate(earn_simple_earn_{w}_batch_size_bucket[5m])))", f"{w} p{q * 100:g}")
        for w in ("subscribe", "redeem") for q in (0.5, 0.99)
    ], "short", width=6)
    grpc_section(d, "earn.v1.SimpleEarnService")
    outbox_section(d, "simple_earn", "simple_earn")
    process_section(d, "simple_earn")
    return d


def accrual() -> Dashboard:
    d = Dashboard("earn-accrual", "Earn platform: accrual engine",
                  "The faust workers over simple_earn.accrual: events applied, rate index updates, hour ticks, lag, payouts.",
                  ["earn", "accrual"])
    d.row("Input")
    d.timeseries("Events applied by type", "Input events processed per second (position changes, rates, ticks, payout requests).",
                 [(f"sum by (type) (rate(earn_accrual_events_total[{R}]))", "{{type}}")], "ops")
    d.timeseries("Events skipped by reason", "Duplicates (redelivery, harmless) and refused input (undecodable, unknown type, invalid).",
                 [(f"sum by (reason) (rate(earn_accrual_events_skipped_total[{R}]))", "{{reason}}")], "ops")
    d.timeseries("Consumer lag by partition", "Input messages not yet processed, as of the last one processed (a stalled worker shows its last value: see Ticks).",
                 [("max by (partition) (earn_accrual_consumer_lag)", "partition {{partition}}")])
    d.timeseries("Rate index updates", "Rate index epochs set per second (one per product rate change and partition).",
                 [(f"sum(rate(earn_accrual_index_updates_total[{R}]))", "index updates")], "ops")
    d.row("Hour ticks")
    d.timeseries("Tick to visible (p50, p99 over 2 h)", "From the hour's close committed by Simple Earn to the engine applying it.", [
        ("histogram_quantile(0.5, sum by (le) (increase(earn_accrual_tick_to_visible_seconds_bucket[2h])))", "p50"),
        ("histogram_quantile(0.99, sum by (le) (increase(earn_accrual_tick_to_visible_seconds_bucket[2h])))", "p99"),
    ], "s")
    d.timeseries("Ticks applied per hour, per worker", "One HourClosed per partition per hour: a worker at 0 for long is stalled.",
                 [("sum by (instance) (increase(earn_accrual_tick_to_visible_seconds_count[1h]))", "{{instance}}")])
    d.row("Payouts")
    d.timeseries("Payout requests per hour", "PayoutRequested processed (one per partition per payout).",
                 [("sum(increase(earn_accrual_payout_requests_total[1h]))", "requests")])
    d.timeseries("Payout items emitted", "Per second, re-emissions after a restart included.",
                 [(f"sum(rate(earn_accrual_payout_items_total[{R}]))", "items")], "ops")
    process_section(d, "accrual")
    return d


def jobs() -> Dashboard:
    d = Dashboard("earn-jobs", "Earn platform: jobs",
                  "The scheduler's jobs (ticks, payouts, maturities): last success, periods due, runs, durations.",
                  ["earn", "jobs"])
    d.row("Schedule")
    d.stat("Hourly jobs: since last success", "Over an hour and a half is a missed period (alert EarnHourlyJobLate).",
           [('time() - max by (job_name) (earn_job_last_success_timestamp_seconds{job_name!~".+[.]daily"})', "{{job_name}}")], "s",
           width=12, steps=[("green", None), ("orange", 3900), ("red", 5400)])
    d.stat("Daily jobs: since last success", "Over 26 hours is a missed period (alert EarnDailyJobLate).",
           [('time() - max by (job_name) (earn_job_last_success_timestamp_seconds{job_name=~".+[.]daily"})', "{{job_name}}")], "s",
           width=12, steps=[("green", None), ("orange", 87000), ("red", 93600)])
    d.stat("Last success", "When each job last succeeded.",
           [("max by (job_name) (earn_job_last_success_timestamp_seconds) * 1000", "{{job_name}}")], "dateTimeAsIso", width=24)
    d.timeseries("Periods due", "Periods due and not yet succeeded; more than one means the job is behind.",
                 [("max by (job_name) (earn_job_due_periods)", "{{job_name}}")], width=24, height=6)
    d.row("Runs")
    d.timeseries("Runs per hour by outcome", "succeeded, failed, interrupted.",
                 [("sum by (job_name, status) (increase(earn_job_runs_total[1h]))", "{{job_name}} {{status}}")])
    d.timeseries("Run duration (p50, p95 over 6 h)", "Each attempt, from first step to last.", [
        ("histogram_quantile(0.5, sum by (job_name, le) (increase(earn_job_duration_seconds_bucket[6h])))", "p50 {{job_name}}"),
        ("histogram_quantile(0.95, sum by (job_name, le) (increase(earn_job_duration_seconds_bucket[6h])))", "p95 {{job_name}}"),
    ], "s")
    process_section(d, "scheduler")
    return d


def launchpool() -> Dashboard:
    d = Dashboard("earn-launchpool", "Earn platform: Launchpool",
                  "Stakes in and out and rewards paid per pool, the engine's launchpool agent, payout batches, gRPC methods, outbox.",
                  ["earn", "launchpool"])
    d.row("Money per pool (units of the asset)")
    d.per_hour("Staked per hour", "Amounts staked, in the stake asset.",
               "earn_launchpool_staked_total", "pool, asset", "{{pool}} ({{asset}})", width=8)
    d.per_hour("Unstaked per hour", "Amounts unstaked, in the stake asset.",
               "earn_launchpool_unstaked_total", "pool, asset", "{{pool}} ({{asset}})", width=8)
    d.per_hour("Rewards paid per hour", "Rewards credited, in the reward asset.",
               "earn_launchpool_rewards_paid_total", "pool, asset", "{{pool}} ({{asset}})", width=8)
    d.per_hour("Payout batches per hour by outcome", "Engine batches consumed: paid, duplicate (a redelivery, harmless), dead_letter (alert EarnLaunchpoolPayoutDeadLetters).",
               "earn_launchpool_payout_batches_total", "outcome", "{{outcome}}", width=24, height=6)
    d.row("Engine: the launchpool agent of the accrual workers")
    d.timeseries("Events applied by type", "Input events of launchpool.accrual processed per second (pools, stake changes, hour ticks, payout requests).",
                 [(f"sum by (type) (rate(earn_accrual_launchpool_events_total[{R}]))", "{{type}}")], "ops", width=6)
    d.timeseries("Events skipped by reason", "Duplicates (a redelivery, harmless) and refused input.",
                 [(f"sum by (reason) (rate(earn_accrual_launchpool_events_skipped_total[{R}]))", "{{reason}}")], "ops", width=6)
    d.timeseries("Consumer lag by partition", "Input messages not yet processed, as of the last one processed.",
                 [("max by (partition) (earn_accrual_launchpool_consumer_lag)", "partition {{partition}}")], width=6)
    d.timeseries("Reward items emitted", "Per second, re-emissions after a restart included.",
                 [(f"sum(rate(earn_accrual_launchpool_payout_items_total[{R}]))", "items")], "ops", width=6)
    grpc_section(d, "earn.v1.LaunchpoolService")
    outbox_section(d, "launchpool", "launchpool")
    process_section(d, "launchpool")
    return d


def candydrop() -> Dashboard:
    d = Dashboard("earn-candydrop", "Earn platform: CandyDrop",
                  "The exchange's events counted for campaigns, registrations, distributions and prizes, gRPC methods.",
                  ["earn", "candydrop"])
    d.row("Exchange events")
    d.timeseries("Events by topic and outcome", "counted, not_counted (no open task of a registered user), duplicate, ignored, dead_letter (alert EarnInputDeadLetters).",
                 [(f"sum by (topic, outcome) (rate(earn_candydrop_events_total[{R}]))", "{{topic}} {{outcome}}")], "ops", width=24, stack=True)
    d.row("Campaigns")
    d.per_hour("Registrations per hour", "Register calls answered OK, repeats included.",
               "earn_candydrop_registrations_total", "", "registrations", width=8)
    d.per_hour("Campaigns distributed per day", "Campaigns whose prizes were all paid (job candydrop.distribution).",
               "earn_candydrop_campaigns_distributed_total", "", "campaigns", width=8, window="1d")
    d.per_hour("Prizes paid per hour", "In units of the prize asset.",
               "earn_candydrop_prizes_paid_total", "asset", "{{asset}}", width=8)
    grpc_section(d, "earn.v1.CandyDropService")
    process_section(d, "candydrop")
    return d


def hodler() -> Dashboard:
    d = Dashboard("earn-hodler", "Earn platform: HODLer Airdrop",
                  "Wallet postings applied to counted holdings, airdrops by status, distributions and rewards, gRPC methods.",
                  ["earn", "hodler"])
    d.row("Wallet events")
    d.timeseries("Postings by outcome", "applied, duplicate (redelivered), ignored (no counted holding changed), dead_letter.",
                 [(f"sum by (outcome) (rate(earn_hodler_events_total[{R}]))", "{{outcome}}")], "ops", width=16, stack=True)
    d.per_hour("Late postings per hour", "Postings stamped inside an airdrop's window that arrived after its distribution began: not counted (alert EarnHodlerLatePostings).",
               "earn_hodler_late_changes_total", "", "late", width=8)
    d.row("Airdrops")
    d.timeseries("Airdrops by status", "upcoming, active, ended (not paid yet), distributed.",
                 [("max by (status) (earn_hodler_airdrops)", "{{status}}")], width=8)
    d.per_hour("Airdrops distributed per day", "Airdrops whose rewards were all paid (job hodler.distribution).",
               "earn_hodler_airdrops_distributed_total", "", "airdrops", width=8, window="1d")
    d.per_hour("Rewards paid per hour", "In units of the reward asset.",
               "earn_hodler_rewards_paid_total", "asset", "{{asset}}", width=8)
    grpc_section(d, "earn.v1.HodlerService")
    process_section(d, "hodler")
    return d


def market() -> Dashboard:
    d = Dashboard("earn-market", "Earn platform: market prices",
                  "The index feed (market.prices) the market stores and serves: freshness per pair, ticks, refused TWAPs, gRPC methods.",
                  ["earn", "market"])
    d.row("Feed")
    d.stat("Age of the newest price", "Since the event time of the newest tick stored, per pair (alert EarnMarketPricesStale over 5 minutes).",
           [("time() - max by (pair) (earn_market_last_tick_timestamp_seconds)", "{{pair}}")], "s", width=24,
           steps=[("green", None), ("orange", 120), ("red", 300)])
    d.timeseries("Ticks by pair and outcome", "Ticks received per second: stored, duplicate (a redelivery).",
                 [(f"sum by (pair, outcome) (rate(earn_market_ticks_total[{R}]))", "{{pair}} {{outcome}}")], "ops", width=8)
    d.per_hour("TWAPs refused per hour by pair", "GetTwap calls refused for missing data (a gap longer than EARN_MAX_GAP_SECONDS): settlements wait.",
               "earn_market_twap_refused_total", "pair", "{{pair}}", width=8)
    d.per_hour("Unreadable records parked", "Records of market.prices parked in dead_letters, per hour (alert EarnInputDeadLetters).",
               "earn_market_dead_letters_total", "", "dead letters", width=8)
    grpc_section(d, "earn.v1.MarketService")
    process_section(d, "market")
    return d


def dual() -> Dashboard:
    d = Dashboard("earn-dual", "Earn platform: Dual Investment",
                  "Subscriptions and settlements at the market's TWAP: money in and out, outcomes, failed settlements, gRPC methods.",
                  ["earn", "dual"])
    d.row("Money (units of the asset)")
    d.per_hour("Subscribed per hour", "By invested asset and direction.",
               "earn_dual_subscribed_total", "asset, direction", "{{asset}} {{direction}}", width=12)
    d.per_hour("Paid per hour", "Settlement payouts, by payout asset.",
               "earn_dual_paid_total", "asset", "{{asset}}", width=12)
    d.row("Settlements (job dual.settlement)")
    d.per_hour("Subscriptions settled per hour by outcome", "converted (paid in the other asset) or not_converted.",
               "earn_dual_subscriptions_settled_total", "outcome", "{{outcome}}", width=12)
    settlement_failures(d, "dual")
    grpc_section(d, "earn.v1.DualService")
    process_section(d, "dual")
    return d


def leverage() -> Dashboard:
    d = Dashboard("earn-leverage", "Earn platform: Smart Leverage",
                  "The platform's open exposure, quotes, subscriptions, settlements and early redemptions, failed settlements, gRPC methods.",
                  ["earn", "leverage"])
    d.row("Exposure")
    d.timeseries("Open notional by underlying and direction", "Principal x leverage of the open positions, in the quote asset (capped per product by its treasury).",
                 [("sum by (underlying, direction) (earn_leverage_exposure)", "{{underlying}} {{direction}}")], width=24, stack=True)
    d.row("Money (units of the asset)")
    d.per_hour("Quotes per hour", "By underlying and direction.",
               "earn_leverage_quotes_total", "underlying, direction", "{{underlying}} {{direction}}", width=8)
    d.per_hour("Subscribed per hour", "Principal, by quote asset and direction.",
               "earn_leverage_subscribed_total", "asset, direction", "{{asset}} {{direction}}", width=8)
    d.per_hour("Paid per hour", "At settlement and early redemption.",
               "earn_leverage_paid_total", "asset", "{{asset}}", width=8)
    d.row("Settlements (job leverage.settlement) and early redemptions")
    d.per_hour("Positions closed per hour", "By kind (maturity, early) and outcome (paid, zero, capped by the treasury).",
               "earn_leverage_positions_settled_total", "kind, outcome", "{{kind}} {{outcome}}", width=12)
    settlement_failures(d, "leverage")
    grpc_section(d, "earn.v1.LeverageService")
    process_section(d, "leverage")
    return d


def loan() -> Dashboard:
    d = Dashboard("earn-loan", "Earn platform: Crypto Loan",
                  "Open loans per LTV band (the engine's monitor), margin calls and liquidations, price-to-action latency,"
                  " money lent and repaid, gRPC methods, the outbox of loan states.",
                  ["earn", "loan"])
    d.row("Open loans by LTV band (the accrual engine's count, every 10 s while prices or hours move)")
    d.timeseries("Loans per LTV band", "healthy (at or below the initial level), above_initial, margin_call (lower half of margin call"
                 " to liquidation), near_liquidation (upper half: alert EarnLoansNearLiquidation), liquidation (triggered, not yet"
                 " executed: alert EarnLoansLiquidationStuck).",
                 [("sum by (band) (earn_accrual_loans_by_ltv_band)", "{{band}}")], width=16, stack=True)
    d.stat("Near or over liquidation", "Open loans in the near_liquidation and liquidation bands.",
           [('sum by (band) (earn_accrual_loans_by_ltv_band{band=~"near_liquidation|liquidation"})', "{{band}}")],
           width=8, height=8, steps=[("green", None), ("orange", 1)])
    d.row("Margin calls and liquidations")
    d.timeseries("Actions recorded per hour by kind", "By the loan service: margin_call, rearmed (LTV back under the re-arm line),"
                 " liquidation (executed).",
                 [("sum by (kind) (increase(earn_loan_actions_total[1h]))", "{{kind}}")], width=12)
    d.timeseries("Actions emitted by the engine per hour by kind", "Triggers sent on loan.actions (a redelivery after a restart is"
                 " counted again; the service records each once).",
                 [("sum by (kind) (increase(earn_accrual_loan_actions_total[1h]))", "{{kind}}")], width=12)
    d.timeseries("Price tick to action recorded (p50, p99 over 1 h)", "From the tick's event time to the loan service recording the"
                 " action (margin call) or executing it (liquidation).", [
        ("histogram_quantile(0.5, sum by (kind, le) (increase(earn_loan_price_to_action_seconds_bucket[1h])))", "p50 {{kind}}"),
        ("histogram_quantile(0.99, sum by (kind, le) (increase(earn_loan_price_to_action_seconds_bucket[1h])))", "p99 {{kind}}"),
    ], "s", width=12)
    d.timeseries("Price tick to the engine's last action (p50, p99 over 1 h)", "From the tick's event time to the engine sending the"
                 " last action it caused.", [
        ("histogram_quantile(0.5, sum by (le) (increase(earn_accrual_loan_tick_to_action_seconds_bucket[1h])))", "p50"),
        ("histogram_quantile(0.99, sum by (le) (increase(earn_accrual_loan_tick_to_action_seconds_bucket[1h])))", "p99"),
    ], "s", width=12)
    d.row("Money (units of the loan asset)")
    d.per_hour("Borrowed per hour", "Lent from the desk's treasury, by loan asset.",
               "earn_loan_borrowed_total", "asset", "{{asset}}", width=12)
    d.per_hour("Repaid per hour", "Interest and principal repaid by users, by loan asset (liquidations not included).",
               "earn_loan_repaid_total", "asset", "{{asset}}", width=12)
    d.row("Engine input (loan.ltv)")
    d.timeseries("Loan input events by type", "Loan states, hour starts and the price ticks copied into every partition, per second.",
                 [(f"sum by (type) (rate(earn_accrual_loan_events_total[{R}]))", "{{type}}")], "ops", width=24)
    grpc_section(d, "earn.v1.LoanService")
    outbox_section(d, "loan", "loan")
    process_section(d, "loan")
    return d


DASHBOARDS = {
    "overview": overview, "wallet": wallet, "simple-earn": simple_earn, "accrual": accrual, "jobs": jobs,
    "launchpool": launchpool, "candydrop": candydrop, "hodler": hodler, "market": market, "dual": dual, "leverage": leverage, "loan": loan,
}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"earn-{name}.json": json.dumps(build().model(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    files = render()
    for stale in set(p.name for p in OUT.glob("*.json")) - set(files):
        (OUT / stale).unlink()
    for name, text in files.items():
        (OUT / name).write_text(text)
    print(f"wrote {len(files)} dashboards to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
