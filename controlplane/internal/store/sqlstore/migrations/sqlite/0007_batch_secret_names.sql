-- The secret variable names of a batch's workflow when the batch was
-- created (a JSON array), so that its inputs stay redacted after the
-- definition is edited. Batches created before this version have none
-- stored and are redacted with their workflow's current names, as before.
ALTER TABLE batches ADD COLUMN secret_names TEXT;
