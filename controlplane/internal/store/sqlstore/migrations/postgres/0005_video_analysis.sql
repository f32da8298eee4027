-- Recorded workflows (issue 5): the video a workflow is made from and the
-- state of its analysis; PostgreSQL's form of migrations/sqlite/0005. The
-- video itself lives in the video store under video_key. An analysis
-- starts when the video is uploaded (analysis_started_at), is claimed by
-- one analyzer at a time (a guarded UPDATE on analysis_claim_id IS NULL)
-- and finishes with a definition or an error (analysis_error, JSON
-- {code, message}).
ALTER TABLE workflows ADD COLUMN video_key TEXT COLLATE "C";
ALTER TABLE workflows ADD COLUMN video_size BIGINT;
ALTER TABLE workflows ADD COLUMN video_duration_ms BIGINT;
ALTER TABLE workflows ADD COLUMN video_container TEXT COLLATE "C";
ALTER TABLE workflows ADD COLUMN analysis_started_at BIGINT;
ALTER TABLE workflows ADD COLUMN analysis_finished_at BIGINT;
ALTER TABLE workflows ADD COLUMN analysis_error TEXT COLLATE "C";
ALTER TABLE workflows ADD COLUMN analysis_claim_id TEXT COLLATE "C";
ALTER TABLE workflows ADD COLUMN analysis_claimed_by TEXT COLLATE "C";
ALTER TABLE workflows ADD COLUMN analysis_claimed_at BIGINT;

-- Workflows made analyzing before this version started their analysis when
-- they were last changed.
UPDATE workflows SET analysis_started_at = updated_at WHERE status = 'analyzing' AND analysis_started_at IS NULL;

-- The analyzers' queue and the analysis timeout read analyzing workflows by
-- the start of their analysis.
CREATE INDEX workflows_analysis ON workflows (status, analysis_started_at, id);
