"""Scheduler: distribution and settlement jobs on a UTC calendar, with run records and catch-up.

- ``domain``: hours, periods, what is due (pure);
- ``store``: run records keyed by (job, period) and the per-job lock;
- ``jobs``: the jobs, their idempotent steps over Simple Earn's job RPCs, and the runner;
- ``main``: the long-running process; ``cli``: the operator CLI (list, preview, trigger, catch-up).
"""
