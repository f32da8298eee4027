-- Agents, leases, run history and artifacts (dispatch, API.md §9).
ALTER TABLE runs ADD COLUMN lease_expires_at BIGINT;
ALTER TABLE runs ADD COLUMN assigned_at BIGINT;
CREATE INDEX runs_lease_expiry ON runs (lease_expires_at) WHERE lease_id IS NOT NULL AND status IN ('queued', 'running', 'awaiting_approval');
CREATE INDEX runs_agent_held ON runs (agent_id) WHERE lease_id IS NOT NULL AND status IN ('queued', 'running', 'awaiting_approval');
CREATE INDEX runs_queued ON runs (account_id, queued_at, id) WHERE status = 'queued' AND lease_id IS NULL;

CREATE TABLE agents (
    id         TEXT COLLATE "C" PRIMARY KEY,
    account_id TEXT COLLATE "C" NOT NULL,
    client_id  TEXT COLLATE "C" NOT NULL,
    name       TEXT COLLATE "C" NOT NULL,
    kind       TEXT COLLATE "C" NOT NULL,
    version    TEXT COLLATE "C" NOT NULL,
    labels     TEXT COLLATE "C",
    created_at BIGINT NOT NULL,
    seen_at    BIGINT NOT NULL,
    UNIQUE (account_id, client_id)
);

-- Every applied agent event, in order. (lease_id, lease_seq) is applied once.
CREATE TABLE run_events (
    run_id     TEXT COLLATE "C" NOT NULL,
    seq        BIGINT NOT NULL,
    lease_id   TEXT COLLATE "C" NOT NULL,
    lease_seq  BIGINT NOT NULL,
    kind       TEXT COLLATE "C" NOT NULL,
    body       TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (run_id, seq),
    UNIQUE (lease_id, lease_seq)
);

CREATE TABLE artifacts (
    run_id       TEXT COLLATE "C" NOT NULL,
    name         TEXT COLLATE "C" NOT NULL,
    content_type TEXT COLLATE "C" NOT NULL,
    size         BIGINT NOT NULL,
    sha256       TEXT COLLATE "C" NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (run_id, name)
);
