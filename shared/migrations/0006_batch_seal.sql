-- Batches: all or none, and in the request's order.
--
-- * batches.sealed_at: every image of the batch is stored (set by the submit after its uploads, before any send).
--   Nothing of an unsealed batch is sent: the reconciler's unconfirmed-send step skips its jobs, and aborts an
--   unsealed batch whose submit died (every queued job failed enqueue_failed, whatever its image). Batches created
--   before this migration count as sealed (their submits ran under the old rules, job by job).
-- * jobs.batch_index: the job's place in the batch request (0-based); GET /api/batches/{id} lists the jobs by it.

ALTER TABLE batches ADD COLUMN sealed_at timestamptz;
UPDATE batches SET sealed_at = created_at;

ALTER TABLE jobs ADD COLUMN batch_index integer;
UPDATE jobs SET batch_index = ordered.i
FROM (
    SELECT job_id, row_number() OVER (PARTITION BY batch_id ORDER BY created_at, job_id) - 1 AS i
    FROM jobs WHERE batch_id IS NOT NULL
) ordered
WHERE jobs.job_id = ordered.job_id;
ALTER TABLE jobs ADD CONSTRAINT jobs_batch_index_check CHECK (batch_index >= 0);

DROP INDEX jobs_batch_idx;
CREATE UNIQUE INDEX jobs_batch_idx ON jobs (batch_id, batch_index) WHERE batch_id IS NOT NULL;
-- The reconciler's abort step reads the unsealed batches (a dead submit's, or aborted ones).
CREATE INDEX batches_unsealed_idx ON batches (created_at) WHERE sealed_at IS NULL;
