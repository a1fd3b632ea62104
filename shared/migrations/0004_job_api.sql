-- The job API (cancel, retry, progress, priorities, batches, webhooks, stats) on the lifecycle of shared/lifecycle.py.
--
-- * cancel_requested_at: a running job's cancellation was requested; its attempt stops at its next checkpoint
--   (event stop), or the reconciler cancels it once its lease runs out (cancel_expired);
-- * forgiven: attempts a manual retry forgave (charged attempts = attempts - drains - forgiven);
-- * progress: {stage, fraction, updated_at} of the running attempt, written by the worker (event progress);
-- * priority: which queue carries the job's messages (jobs-high or jobs);
-- * callback_url / callback_events / webhook_secret: where and what to notify (Standard Webhooks), and the secret the
--   deliveries are signed with (returned once, at submit; never in a status answer);
-- * job_events: the webhook outbox. The statement of an event that notifies inserts its row (shared/lifecycle.py),
--   so a notification exists if and only if the transition happened; the deliverer records each delivery attempt.
-- * batches: jobs submitted together (all or none); workers: the heartbeat rows GET /api/stats reads.

ALTER TABLE jobs
    ADD COLUMN priority            text NOT NULL DEFAULT 'normal' CHECK (priority IN ('high', 'normal')),
    ADD COLUMN batch_id            uuid,
    ADD COLUMN cancel_requested_at timestamptz,
    ADD COLUMN progress            jsonb,
    ADD COLUMN retries             integer NOT NULL DEFAULT 0 CHECK (retries >= 0),
    ADD COLUMN forgiven            integer NOT NULL DEFAULT 0 CHECK (forgiven >= 0),
    ADD COLUMN first_started_at    timestamptz,
    ADD COLUMN callback_url        text,
    ADD COLUMN callback_events     text[],
    ADD COLUMN webhook_secret      text;

UPDATE jobs SET first_started_at = started_at WHERE started_at IS NOT NULL;

-- GET /api/jobs: newest first, keyset on (created_at, job_id), optionally by status; stats windows.
CREATE INDEX jobs_list_idx ON jobs (created_at DESC, job_id DESC);
CREATE INDEX jobs_status_list_idx ON jobs (status, created_at DESC, job_id DESC);
CREATE INDEX jobs_finished_idx ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_batch_idx ON jobs (batch_id) WHERE batch_id IS NOT NULL;

CREATE TABLE batches (
    batch_id        uuid PRIMARY KEY,
    idempotency_key text UNIQUE,
    size            integer NOT NULL CHECK (size >= 1),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE job_events (
    event_id        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id          uuid NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    type            text NOT NULL,          -- job.started, job.progress, job.succeeded, job.failed, job.cancelled
    payload         jsonb NOT NULL,         -- the job as the transition left it
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,            -- handed to the job-events queue (confirmed)
    attempts        integer NOT NULL DEFAULT 0,
    last_status     integer,                -- the receiver's last HTTP status (NULL: no response)
    last_error      text,
    last_attempt_at timestamptz,
    delivered_at    timestamptz,
    gave_up_at      timestamptz
);
CREATE INDEX job_events_unsent_idx ON job_events (created_at) WHERE sent_at IS NULL;
CREATE INDEX job_events_job_idx ON job_events (job_id, created_at);

CREATE TABLE workers (
    worker_id   text PRIMARY KEY,
    host        text NOT NULL,
    device      text NOT NULL,
    current_job uuid,
    started_at  timestamptz NOT NULL DEFAULT now(),
    last_beat   timestamptz NOT NULL DEFAULT now()
);
