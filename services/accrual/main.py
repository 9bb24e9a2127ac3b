"""Accrual engine process: create its topics, serve /metrics, run the faust worker.

`python -m services.accrual.main`; SIGTERM stops the worker gracefully (faust commits
what it processed), SIGKILL is safe too (at-least-once with idempotent state).
"""

from __future__ import annotations

import logging

import faust
from prometheus_client import start_http_server

from services.accrual import launchpool_agent, loan_agent
from services.accrual.app import INPUT, OUTPUT, AccrualSettings, changelog_topics, create_app
from services.kernel import logs, topics
from services.kernel.config import load

log = logging.getLogger(__name__)


def main() -> None:
    settings = load(AccrualSettings)
    logs.configure(settings.log_level)
    created = topics.ensure_topics(settings, [INPUT, OUTPUT], extra=changelog_topics(settings))
    created += topics.ensure_topics(
        settings, [launchpool_agent.INPUT, launchpool_agent.OUTPUT], extra=launchpool_agent.changelog_topics(settings.app_id)
    )
    created += topics.ensure_topics(
        settings, [loan_agent.INPUT, loan_agent.PRICES, loan_agent.OUTPUT], extra=loan_agent.changelog_topics(settings.app_id)
    )
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
    app, _ = create_app(settings)
    launchpool_agent.install(app, settings)  # Launchpool rewards: its own input, tables and agent
    loan_agent.install(app, settings)  # Crypto Loan LTV monitoring: prices joined with open loans
    log.info("accrual engine starting", extra={"app_id": app.conf.id, "topics_created": created})
    worker = _Worker(app, loglevel=settings.log_level, redirect_stdouts=False)
    worker.execute_from_commandline()


class _Worker(faust.Worker):
    """faust's worker with the kernel's JSON logs (mode would install its own handlers)."""

    def _setup_logging(self) -> None:
        logs.configure(str(self.loglevel or "INFO"))


if __name__ == "__main__":
    main()
