-- When the job's message was last handed to Service Bus. NULL on a queued job means the submit that created it
-- died (or failed) between the insert and the send: the worker's sweeper finds those and sends them again.
-- Existing rows stay NULL: a queued job from before this migration is re-sent once (at-least-once is the contract;
-- the worker skips a job that is already terminal).

ALTER TABLE jobs ADD COLUMN enqueued_at timestamptz;

-- The sweeper's query: queued, never sent, oldest first.
CREATE INDEX jobs_unsent_idx ON jobs (created_at) WHERE status = 'queued' AND enqueued_at IS NULL;
