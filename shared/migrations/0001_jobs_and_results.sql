-- Jobs and their results. A result is keyed by its job: a redelivered message can never write a second one.

CREATE TABLE jobs (
    job_id          uuid PRIMARY KEY,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'processing', 'succeeded', 'failed')),
    idempotency_key text UNIQUE,                 -- NULLs are distinct: jobs without a key never collide
    input_blob      text NOT NULL,
    input_sha256    text NOT NULL CHECK (input_sha256 ~ '^[0-9a-f]{64}$'),
    params          jsonb NOT NULL,              -- bands, scale, analysis: what the message carries
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    error_code      text,
    error_message   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT failed_jobs_have_a_code CHECK ((status = 'failed') = (error_code IS NOT NULL))
);

-- Sweepers and dashboards look for jobs that are not finished yet, oldest first.
CREATE INDEX jobs_unfinished_idx ON jobs (updated_at) WHERE status IN ('queued', 'processing');

CREATE TABLE results (
    job_id     uuid PRIMARY KEY REFERENCES jobs (job_id) ON DELETE CASCADE,
    result     jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
