-- The event log behind GET /v1/events (API.md §10): every run, batch,
-- approval and agent change as the API shows it, kept for a while (pruned by
-- created_at). Ids only grow: a stream resumes after the last id it saw.
CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id TEXT NOT NULL,
    type       TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    run_id     TEXT,
    data       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX events_run ON events (run_id, id) WHERE run_id IS NOT NULL;
CREATE INDEX events_account ON events (account_id, id);
CREATE INDEX events_created ON events (created_at);
