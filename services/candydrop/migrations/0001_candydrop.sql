-- CandyDrop: campaigns and their tasks, registrations, task progress counted from the
-- exchange's events (exactly once: the kernel's inbox in the same transaction), prizes.

CREATE TABLE campaigns (
    seq              bigserial      UNIQUE,
    campaign_id      text           PRIMARY KEY,
    prize_asset      text           NOT NULL,
    prize_pool       numeric(38,18) NOT NULL CHECK (prize_pool > 0),
    pool_kind        text           NOT NULL CHECK (pool_kind IN ('pro_rata', 'fixed_per_candy')),
    prize_per_candy  numeric(38,18) CHECK (prize_per_candy > 0),
    per_user_cap     numeric(38,18) CHECK (per_user_cap > 0),
    start_at         timestamptz    NOT NULL,
    end_at           timestamptz    NOT NULL CHECK (end_at > start_at),
    end_hour         bigint         NOT NULL,
    created_at       timestamptz    NOT NULL,
    -- NULL while open; 'distributing' once the prizes are recorded (progress is frozen);
    -- 'distributed' once the wallet paid them all.
    distribution     text           CHECK (distribution IN ('distributing', 'distributed')),
    job              text,
    period           text,
    total_candies    bigint,
    winners          integer,
    paid             numeric(38,18),
    distributed_at   timestamptz
);
CREATE INDEX campaigns_due ON campaigns (end_hour) WHERE distribution IS DISTINCT FROM 'distributed';

CREATE TABLE tasks (
    campaign_id      text           NOT NULL REFERENCES campaigns (campaign_id),
    task_id          text           NOT NULL,
    position         integer        NOT NULL,
    kind             text           NOT NULL,
    asset            text           NOT NULL,  -- '' : any asset (first deposit only)
    threshold        numeric(38,18) CHECK (threshold > 0),
    candies          integer        NOT NULL CHECK (candies > 0),
    max_completions  integer        NOT NULL CHECK (max_completions > 0),
    PRIMARY KEY (campaign_id, task_id)
);

CREATE TABLE registrations (
    campaign_id    text        NOT NULL REFERENCES campaigns (campaign_id),
    user_id        text        NOT NULL,
    registered_at  timestamptz NOT NULL,
    PRIMARY KEY (campaign_id, user_id)
);
CREATE INDEX registrations_user ON registrations (user_id);

-- The summed amount counted for (campaign, task, user); first deposit: 0 or 1.
CREATE TABLE progress (
    campaign_id  text           NOT NULL,
    task_id      text           NOT NULL,
    user_id      text           NOT NULL,
    amount       numeric(38,18) NOT NULL CHECK (amount >= 0),
    events       integer        NOT NULL,
    updated_at   timestamptz    NOT NULL,
    PRIMARY KEY (campaign_id, task_id, user_id),
    FOREIGN KEY (campaign_id, task_id) REFERENCES tasks (campaign_id, task_id)
);

-- One prize per (campaign, user), recorded with the distribution, paid by chunk.
CREATE TABLE prizes (
    id           bigserial      PRIMARY KEY,
    campaign_id  text           NOT NULL REFERENCES campaigns (campaign_id),
    user_id      text           NOT NULL,
    candies      bigint         NOT NULL CHECK (candies > 0),
    amount       numeric(38,18) NOT NULL CHECK (amount >= 0),
    chunk        integer        NOT NULL,
    posting_id   text,
    paid_at      timestamptz,
    UNIQUE (campaign_id, user_id)
);
CREATE INDEX prizes_user ON prizes (user_id, id);
CREATE INDEX prizes_chunk ON prizes (campaign_id, chunk);

-- Event records that could not be read, parked for a look.
CREATE TABLE dead_letters (
    topic        text        NOT NULL,
    "partition"  integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    error        text        NOT NULL,
    raw          bytea       NOT NULL,
    parked_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, "partition", "offset")
);
