-- A batch's runs are queued in one transaction, at the same millisecond:
-- dispatch takes them in iteration order (then by id), as users read a
-- batch, instead of in the random order of their ids.
DROP INDEX runs_queued;
CREATE INDEX runs_queued ON runs (account_id, queued_at, iteration, id) WHERE status = 'queued' AND lease_id IS NULL;
