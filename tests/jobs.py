"""A job record for tests that need a :class:`~shared.jobs.Job` without a repository."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from shared.jobs import Job, JobStatus


def job_record(status: JobStatus, **fields: Any) -> Job:
    now = datetime.now(UTC)
    defaults: dict[str, Any] = {
        "job_id": uuid.uuid4(),
        "created_at": now,
        "updated_at": now,
        "attempts": 1,
        "input_blob": "x/input.tif",
        "input_sha256": "0" * 64,
        "params": {},
    }
    return Job(status=status, **{**defaults, **fields})
