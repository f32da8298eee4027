-- Agents, leases, run history and artifacts (dispatch, API.md §9).
ALTER TABLE runs ADD COLUMN lease_expires_at BIGINT;
ALTER TABLE runs ADD COLUMN assigned_at BIGINT;
CREATE INDEX runs_lease_expiry ON runs (lease_expires_at) WHERE lease_id IS NOT NULL AND status IN ('queued', 'running', 'awaiting_approval');
CREATE INDEX runs_agent_held ON runs (agent_id) WHERE lease_id IS NOT NULL AND status IN ('queued', 'running', 'awaiting_approval');
CREATE INDEX runs_queued ON runs (account_id, queued_at, id) WHERE status = 'queued' AND lease_id IS NULL;

CREATE TABLE agents (
    id         TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    client_id  TEXT NOT NULL,
    name       TEXT NOT NULL,
    kind       TEXT NOT NULL,
    version    TEXT NOT NULL,
    labels     TEXT,
    created_at BIGINT NOT NULL,
    seen_at    BIGINT NOT NULL,
    UNIQUE (account_id, client_id)
);

-- Every applied agent event, in order. (lease_id, lease_seq) is applied once.
CREATE TABLE run_events (
    run_id     TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    lease_id   TEXT NOT NULL,
    lease_seq  BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    body       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (run_id, seq),
    UNIQUE (lease_id, lease_seq)
);

CREATE TABLE artifacts (
    run_id       TEXT NOT NULL,
    name         TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size         BIGINT NOT NULL,
    sha256       TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (run_id, name)
);
