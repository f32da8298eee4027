-- Copelf control plane schema, version 1, for PostgreSQL: the shape of
-- migrations/sqlite/0001_init.sql. Times are Unix milliseconds (UTC); JSON
-- documents are TEXT. Every TEXT column compares bytewise (COLLATE "C"), as
-- SQLite's do, whatever the database's locale; integers are BIGINT, as wide
-- as SQLite's INTEGER.
CREATE TABLE users (
    id            TEXT COLLATE "C" PRIMARY KEY,
    email         TEXT COLLATE "C" NOT NULL,
    email_lower   TEXT COLLATE "C" NOT NULL UNIQUE,
    password_hash TEXT COLLATE "C" NOT NULL,
    role          TEXT COLLATE "C" NOT NULL,
    plan          TEXT COLLATE "C" NOT NULL,
    created_at    BIGINT NOT NULL
);

-- balance and held are kept in step with the ledger and the holds in the same
-- transaction; the CHECK is the last line of defence against overspending.
CREATE TABLE accounts (
    id                 TEXT COLLATE "C" PRIMARY KEY,
    balance            BIGINT NOT NULL DEFAULT 0,
    held               BIGINT NOT NULL DEFAULT 0,
    stripe_customer_id TEXT COLLATE "C",
    CHECK (held >= 0 AND held <= balance)
);

CREATE TABLE tokens (
    id         TEXT COLLATE "C" PRIMARY KEY,
    user_id    TEXT COLLATE "C" NOT NULL REFERENCES users (id),
    kind       TEXT COLLATE "C" NOT NULL,
    name       TEXT COLLATE "C" NOT NULL,
    hash       TEXT COLLATE "C" NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX tokens_user ON tokens (user_id, created_at);

CREATE TABLE workflows (
    id              TEXT COLLATE "C" PRIMARY KEY,
    account_id      TEXT COLLATE "C" NOT NULL,
    name            TEXT COLLATE "C" NOT NULL,
    status          TEXT COLLATE "C" NOT NULL,
    definition      TEXT COLLATE "C",
    active_run_id   TEXT COLLATE "C",
    active_batch_id TEXT COLLATE "C",
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    deleted_at      BIGINT,
    CHECK (active_run_id IS NULL OR active_batch_id IS NULL)
);
CREATE INDEX workflows_account ON workflows (account_id, created_at, id);

CREATE TABLE runs (
    id                  TEXT COLLATE "C" PRIMARY KEY,
    account_id          TEXT COLLATE "C" NOT NULL,
    workflow_id         TEXT COLLATE "C" NOT NULL,
    batch_id            TEXT COLLATE "C",
    iteration           BIGINT,
    status              TEXT COLLATE "C" NOT NULL,
    inputs              TEXT COLLATE "C" NOT NULL,
    secret_names        TEXT COLLATE "C",
    outputs             TEXT COLLATE "C" NOT NULL,
    error               TEXT COLLATE "C",
    agent_id            TEXT COLLATE "C",
    attempt             BIGINT NOT NULL DEFAULT 0,
    lease_id            TEXT COLLATE "C",
    steps               TEXT COLLATE "C" NOT NULL,
    queue_reason        TEXT COLLATE "C",
    queue_since         BIGINT,
    labels              TEXT COLLATE "C",
    timeout_ms          BIGINT NOT NULL DEFAULT 0,
    queue_timeout_ms    BIGINT NOT NULL DEFAULT 0,
    cost_reserved       BIGINT NOT NULL DEFAULT 0,
    cost_charged        BIGINT NOT NULL DEFAULT 0,
    queued_at           BIGINT NOT NULL,
    started_at          BIGINT,
    finished_at         BIGINT,
    cancel_requested_at BIGINT
);
CREATE INDEX runs_account ON runs (account_id, queued_at, id);
CREATE INDEX runs_workflow ON runs (workflow_id, queued_at, id);
CREATE INDEX runs_batch ON runs (batch_id, iteration);
CREATE INDEX runs_status ON runs (status, queued_at);

-- A hold reserves a run's cost; it is captured or voided at most once.
CREATE TABLE credit_holds (
    id          TEXT COLLATE "C" PRIMARY KEY,
    account_id  TEXT COLLATE "C" NOT NULL,
    run_id      TEXT COLLATE "C" NOT NULL UNIQUE,
    amount      BIGINT NOT NULL,
    status      TEXT COLLATE "C" NOT NULL,
    created_at  BIGINT NOT NULL,
    resolved_at BIGINT
);
CREATE INDEX credit_holds_pending ON credit_holds (account_id) WHERE status = 'pending';

-- Append-only. idem_key makes each external trigger count at most once.
CREATE TABLE ledger (
    id          TEXT COLLATE "C" PRIMARY KEY,
    account_id  TEXT COLLATE "C" NOT NULL,
    kind        TEXT COLLATE "C" NOT NULL,
    amount      BIGINT NOT NULL,
    run_id      TEXT COLLATE "C",
    coupon_code TEXT COLLATE "C",
    reason      TEXT COLLATE "C",
    idem_key    TEXT COLLATE "C" UNIQUE,
    created_at  BIGINT NOT NULL
);
CREATE INDEX ledger_account ON ledger (account_id, created_at, id);

CREATE TABLE approvals (
    id          TEXT COLLATE "C" PRIMARY KEY,
    account_id  TEXT COLLATE "C" NOT NULL,
    run_id      TEXT COLLATE "C" NOT NULL,
    workflow_id TEXT COLLATE "C" NOT NULL,
    step        BIGINT NOT NULL,
    message     TEXT COLLATE "C" NOT NULL,
    status      TEXT COLLATE "C" NOT NULL,
    created_at  BIGINT NOT NULL,
    resolved_at BIGINT,
    resolved_by TEXT COLLATE "C",
    comment     TEXT COLLATE "C"
);
CREATE UNIQUE INDEX approvals_one_pending ON approvals (run_id) WHERE status = 'pending';
CREATE INDEX approvals_account ON approvals (account_id, created_at, id);
CREATE INDEX approvals_workflow ON approvals (workflow_id, status);

CREATE TABLE batches (
    id              TEXT COLLATE "C" PRIMARY KEY,
    account_id      TEXT COLLATE "C" NOT NULL,
    workflow_id     TEXT COLLATE "C" NOT NULL,
    status          TEXT COLLATE "C" NOT NULL,
    concurrency     BIGINT NOT NULL,
    stop_on_failure BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    started_at      BIGINT,
    finished_at     BIGINT
);
CREATE INDEX batches_account ON batches (account_id, created_at, id);

CREATE TABLE batch_iterations (
    batch_id TEXT COLLATE "C" NOT NULL,
    idx      BIGINT NOT NULL,
    inputs   TEXT COLLATE "C" NOT NULL,
    run_id   TEXT COLLATE "C",
    PRIMARY KEY (batch_id, idx)
);

CREATE TABLE idempotency_keys (
    account_id   TEXT COLLATE "C" NOT NULL,
    idem_key     TEXT COLLATE "C" NOT NULL,
    request_hash TEXT COLLATE "C" NOT NULL,
    done         BIGINT NOT NULL DEFAULT 0,
    status       BIGINT NOT NULL DEFAULT 0,
    body         TEXT COLLATE "C",
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (account_id, idem_key)
);
