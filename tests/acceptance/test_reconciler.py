"""The timer-triggered reconciler in the running stack: with no worker at all, an orphaned job (the Functions host
died between the insert and the send) is handed over by the timer Function alone; a worker started later runs it."""

from __future__ import annotations

import hashlib
import time
import uuid

import httpx
import pytest

from shared.db import PostgresJobStore, open_pool
from shared.jobs import Job
from shared.settings import Settings
from shared.storage import BlobStore
from shared.submission import input_blob_name
from tests.acceptance.client import poll
from tests.acceptance.harness import Stack
from tests.integration.worker_helpers import FIELDS, RGBN

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]


def test_the_timer_reconciler_heals_an_orphaned_job_with_no_worker(stack: Stack, api: httpx.Client) -> None:
    stack.stop_workers()
    settings = Settings.from_env(stack.service_env)
    data = FIELDS.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    job_id = uuid.uuid4()
    with open_pool(settings) as pool:
        jobs = PostgresJobStore(pool)
        store = BlobStore.from_settings(settings)
        try:  # exactly what a host killed between the insert and the send leaves behind
            jobs.create(
                job_id=job_id,
                input_blob=input_blob_name(job_id),
                input_sha256=sha256,
                params={"bands": RGBN, "scale": 10000.0, "analysis": "crop-health"},
                idempotency_key=None,
            )
            store.put_input(job_id, data, sha256)
        finally:
            store.close()
        handed_over = _wait(jobs, job_id, timeout=30)
    assert handed_over.generation == 2, "the reconciler sent a new generation"
    assert "reconcile_jobs" in stack.log("functions")
    assert stack.live_workers() == []

    stack.start_worker()
    final = poll(api, f"/api/jobs/{job_id}", timeout=60)
    assert (final["status"], final["attempts"]) == ("succeeded", 1), final


def _wait(jobs: PostgresJobStore, job_id: uuid.UUID, timeout: float) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = jobs.get(job_id)
        assert job is not None
        if job.sent_at is not None or time.monotonic() > deadline:
            assert job.sent_at is not None, f"the reconciler did not hand the job over: {job}"
            return job
        time.sleep(0.5)
