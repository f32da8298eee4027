-- Copelf control plane schema, version 1. Times are Unix milliseconds (UTC);
-- JSON documents are TEXT. The same shape exists for PostgreSQL.
CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    email         TEXT NOT NULL,
    email_lower   TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL,
    plan          TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);

-- balance and held are kept in step with the ledger and the holds in the same
-- transaction; the CHECK is the last line of defence against overspending.
CREATE TABLE accounts (
    id                 TEXT PRIMARY KEY,
    balance            BIGINT NOT NULL DEFAULT 0,
    held               BIGINT NOT NULL DEFAULT 0,
    stripe_customer_id TEXT,
    CHECK (held >= 0 AND held <= balance)
);

CREATE TABLE tokens (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (id),
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX tokens_user ON tokens (user_id, created_at);

CREATE TABLE workflows (
    id              TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL,
    name            TEXT NOT NULL,
    status          TEXT NOT NULL,
    definition      TEXT,
    active_run_id   TEXT,
    active_batch_id TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    deleted_at      BIGINT,
    CHECK (active_run_id IS NULL OR active_batch_id IS NULL)
);
CREATE INDEX workflows_account ON workflows (account_id, created_at, id);

CREATE TABLE runs (
    id                  TEXT PRIMARY KEY,
    account_id          TEXT NOT NULL,
    workflow_id         TEXT NOT NULL,
    batch_id            TEXT,
    iteration           INTEGER,
    status              TEXT NOT NULL,
    inputs              TEXT NOT NULL,
    secret_names        TEXT,
    outputs             TEXT NOT NULL,
    error               TEXT,
    agent_id            TEXT,
    attempt             INTEGER NOT NULL DEFAULT 0,
    lease_id            TEXT,
    steps               TEXT NOT NULL,
    queue_reason        TEXT,
    queue_since         BIGINT,
    labels              TEXT,
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
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL,
    run_id      TEXT NOT NULL UNIQUE,
    amount      BIGINT NOT NULL,
    status      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    resolved_at BIGINT
);
CREATE INDEX credit_holds_pending ON credit_holds (account_id) WHERE status = 'pending';

-- Append-only. idem_key makes each external trigger count at most once.
CREATE TABLE ledger (
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    amount      BIGINT NOT NULL,
    run_id      TEXT,
    coupon_code TEXT,
    reason      TEXT,
    idem_key    TEXT UNIQUE,
    created_at  BIGINT NOT NULL
);
CREATE INDEX ledger_account ON ledger (account_id, created_at, id);

CREATE TABLE approvals (
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    workflow_id TEXT NOT NULL,
    step        INTEGER NOT NULL,
    message     TEXT NOT NULL,
    status      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    resolved_at BIGINT,
    resolved_by TEXT,
    comment     TEXT
);
CREATE UNIQUE INDEX approvals_one_pending ON approvals (run_id) WHERE status = 'pending';
CREATE INDEX approvals_account ON approvals (account_id, created_at, id);
CREATE INDEX approvals_workflow ON approvals (workflow_id, status);

CREATE TABLE batches (
    id              TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL,
    workflow_id     TEXT NOT NULL,
    status          TEXT NOT NULL,
    concurrency     INTEGER NOT NULL,
    stop_on_failure INTEGER NOT NULL,
    created_at      BIGINT NOT NULL,
    started_at      BIGINT,
    finished_at     BIGINT
);
CREATE INDEX batches_account ON batches (account_id, created_at, id);

CREATE TABLE batch_iterations (
    batch_id TEXT NOT NULL,
    idx      INTEGER NOT NULL,
    inputs   TEXT NOT NULL,
    run_id   TEXT,
    PRIMARY KEY (batch_id, idx)
);

CREATE TABLE idempotency_keys (
    account_id   TEXT NOT NULL,
    idem_key     TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    done         INTEGER NOT NULL DEFAULT 0,
    status       INTEGER NOT NULL DEFAULT 0,
    body         TEXT,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (account_id, idem_key)
);
