-- Webhook retries that cannot be lost (shared/delivery.py, shared/events.py, the reconciler's sweep).
--
-- * next_attempt: the number of the delivery attempt whose message is expected next (1 until an attempt is
--   recorded). A message of an earlier attempt is stale and POSTs nothing; a redelivery of the attempt just before
--   it (its record was written, the send of the next attempt's message may have failed) sends that message again;
-- * next_attempt_at: when that message is due (NULL: none is expected: delivered, given up, or not handed over yet).
--   A pending event whose next_attempt_at is long past has lost its message (dead-lettered, never sent): the
--   reconciler sends it again;
-- * resends: how many times the reconciler did so (each such message has its own id, {event_id}:{attempt}:r{n}).

ALTER TABLE job_events
    ADD COLUMN next_attempt    integer NOT NULL DEFAULT 1 CHECK (next_attempt >= 1),
    ADD COLUMN next_attempt_at timestamptz,
    ADD COLUMN resends         integer NOT NULL DEFAULT 0 CHECK (resends >= 0);

-- Events already handed over: the attempt after the POSTs made so far; a pending one is due since its last attempt
-- (or its hand-over), so one whose chain was lost before this migration is swept once it is old enough.
UPDATE job_events
SET next_attempt = attempts + 1,
    next_attempt_at = CASE WHEN delivered_at IS NULL AND gave_up_at IS NULL THEN coalesce(last_attempt_at, sent_at) END
WHERE sent_at IS NOT NULL OR attempts > 0;

-- The reconciler's sweep of stalled deliveries: pending events by the time their next message was due.
CREATE INDEX job_events_pending_idx ON job_events (next_attempt_at) WHERE delivered_at IS NULL AND gave_up_at IS NULL;
