-- The job lifecycle of shared/lifecycle.py: states queued/running/succeeded/failed/cancelled, message generations,
-- fenced attempts with leases, results that name their attempt, and the dead letters the reconciler has drained.
--
-- Existing rows move to the new model:
-- * 'processing' becomes 'running' with a lease that has already run out: the reconciler re-queues it (or fails it
--   once its attempts are used up), and a redelivered message of the old schema may claim it at once;
-- * enqueued_at becomes sent_at (the send of generation 1 was confirmed); a queued job never sent stays unconfirmed
--   and the reconciler hands it over again;
-- * a stored result belongs to the job's last attempt.

ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
UPDATE jobs SET status = 'running' WHERE status = 'processing';
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled'));

ALTER TABLE jobs
    ADD COLUMN generation  integer NOT NULL DEFAULT 1 CHECK (generation >= 1),
    ADD COLUMN sent_at     timestamptz,
    ADD COLUMN worker_id   text,
    ADD COLUMN lease_until timestamptz,
    ADD COLUMN started_at  timestamptz,
    ADD COLUMN finished_at timestamptz,
    -- attempts cut short by a drain (SIGTERM, a Spot eviction): they do not count against JOB_MAX_ATTEMPTS
    ADD COLUMN drains      integer NOT NULL DEFAULT 0 CHECK (drains >= 0);

UPDATE jobs SET sent_at = enqueued_at;
UPDATE jobs SET lease_until = now(), started_at = updated_at WHERE status = 'running';
UPDATE jobs SET finished_at = updated_at WHERE status IN ('succeeded', 'failed');
-- A running attempt always has a lease; nothing else has one.
ALTER TABLE jobs ADD CONSTRAINT running_jobs_have_a_lease CHECK ((status = 'running') = (lease_until IS NOT NULL));

DROP INDEX jobs_unsent_idx;
DROP INDEX jobs_unfinished_idx;
ALTER TABLE jobs DROP COLUMN enqueued_at;

-- The reconciler's queries: queued jobs whose send is unconfirmed, running jobs by lease.
CREATE INDEX jobs_unsent_idx ON jobs (updated_at) WHERE status = 'queued' AND sent_at IS NULL;
CREATE INDEX jobs_lease_idx ON jobs (lease_until) WHERE status = 'running';
CREATE INDEX jobs_queued_idx ON jobs (created_at) WHERE status = 'queued';

ALTER TABLE results ADD COLUMN attempt integer;
UPDATE results r SET attempt = j.attempts FROM jobs j WHERE j.job_id = r.job_id;
ALTER TABLE results ALTER COLUMN attempt SET NOT NULL;

-- Dead letters the reconciler received from the queue's dead-letter sub-queue (and completed there): the record
-- operators read, since the broker's copy is gone once it is handled.
CREATE TABLE dead_letters (
    message_id      text NOT NULL,
    sequence_number bigint NOT NULL,
    job_id          uuid,
    generation      integer,
    reason          text,
    description     text,
    delivery_count  integer,
    enqueued_at     timestamptz,
    received_at     timestamptz NOT NULL DEFAULT now(),
    action          text NOT NULL,  -- what the reconciler did with the job: redrive, failed, none
    PRIMARY KEY (message_id, sequence_number)
);
CREATE INDEX dead_letters_job_idx ON dead_letters (job_id);
