-- Scheduler: one record per (job, period), and where each job's calendar begins.

-- Where a job's sequence of periods begins when it has no succeeded run yet: fixed the
-- first time the job is seen, so a restart before the first success skips nothing.
CREATE TABLE job_starts (
    job         text        PRIMARY KEY,
    start_hour  bigint      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A run of one period of one job. Started idempotently by (job, period): a succeeded
-- run is never run again; a failed or interrupted one (status still 'running' after a
-- crash) is resumed, which is safe because every step of a job is idempotent.
CREATE TABLE job_runs (
    job            text        NOT NULL,
    period         text        NOT NULL,
    cadence        text        NOT NULL CHECK (cadence IN ('hourly', 'daily')),
    boundary_hour  bigint      NOT NULL,
    status         text        NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    -- The step the run is at (or stopped at); empty before the first.
    step           text        NOT NULL DEFAULT '',
    -- 'schedule' (the scheduler process) or 'cli' (an operator's trigger or catch-up).
    triggered_by   text        NOT NULL,
    started_at     timestamptz NOT NULL,
    finished_at    timestamptz,
    attempts       integer     NOT NULL CHECK (attempts > 0),
    -- What the run did: items, amounts paid per asset as decimal strings, ...
    totals         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    error          text,
    PRIMARY KEY (job, period),
    CONSTRAINT finished_when_done CHECK ((status = 'running') = (finished_at IS NULL))
);

CREATE INDEX job_runs_by_boundary ON job_runs (job, boundary_hour DESC);
CREATE INDEX job_runs_recent ON job_runs (started_at DESC);
