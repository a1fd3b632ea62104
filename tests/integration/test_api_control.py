"""Cancel, retry, admission control and the dead letters through the Function App on real backends (PostgreSQL,
Azurite, the Service Bus emulator), dependencies built from the environment as on the first request; and the job
store's reads for the job API on PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from azure.servicebus import ServiceBusClient
from psycopg_pool import ConnectionPool

from functions.deps import Deps
from shared.control import cancel
from shared.db import PostgresJobStore
from shared.jobs import Job, JobStatus
from shared.migrate import migrate
from tests import geotiffs
from tests.contracts.api_store import JobApiStoreContract, letter
from tests.fixtures.servicebus import EmulatorHandle
from tests.functions_client import body, post_job
from tests.integration import test_functions as functions_tier
from tests.job_api_client import cancel_job, get_dead_letters, replay_dead_letters, retry_job

pytestmark = pytest.mark.integration
environment = functions_tier.environment  # the Function App's dependencies built from the environment (fixtures)
app_deps = functions_tier.app_deps

MAX = 5


class TestPostgresJobApiStore(JobApiStoreContract):
    @pytest.fixture
    def store(self, database_url: str) -> Iterator[PostgresJobStore]:
        migrate(database_url)
        with ConnectionPool(database_url, kwargs={"autocommit": True}, min_size=1, max_size=2) as pool:
            yield PostgresJobStore(pool)


def peek(emulator: EmulatorHandle, queue: str = "jobs") -> list[str]:
    with (
        ServiceBusClient.from_connection_string(emulator.connection_string) as client,
        client.get_queue_receiver(queue) as receiver,
    ):
        return [str(m.message_id) for m in receiver.peek_messages(max_message_count=50)]


def submitted(app: Deps, **params: str) -> Job:
    response = post_job(geotiffs.real(geotiffs.RGBN), params={"bands": "B02,B03,B04,B08", **params})
    assert response.status_code == 202, body(response)
    job = app.jobs.get(uuid.UUID(body(response)["job_id"]))
    assert job is not None
    return job


def test_cancel_and_retry_on_real_backends(app_deps: Deps, servicebus_emulator: EmulatorHandle) -> None:
    queued = submitted(app_deps, priority="high")
    cancelled = cancel_job(queued.job_id)
    assert (cancelled.status_code, body(cancelled)["status"]) == (200, "cancelled")
    assert cancel_job(queued.job_id).status_code == 200

    retried = retry_job(queued.job_id)
    assert retried.status_code == 202
    assert (body(retried)["status"], body(retried)["retries"]) == ("queued", 1)
    now = app_deps.jobs.get(queued.job_id)
    assert now is not None
    assert (now.generation, now.sent_at is not None) == (2, True)
    assert peek(servicebus_emulator, "jobs-high") == [f"{queued.job_id}:1", f"{queued.job_id}:2"]
    assert body(retry_job(queued.job_id))["code"] == "not_retryable"

    running = app_deps.jobs.claim(now.job_id, worker_id="w", lease=timedelta(minutes=1), max_attempts=MAX)
    assert running is not None
    requested = cancel_job(now.job_id)
    assert (requested.status_code, body(requested)["cancel_requested"]) == (202, True)
    assert app_deps.jobs.succeed(now.job_id, running.attempts, {}) is None
    assert app_deps.jobs.stop(now.job_id, running.attempts) is not None

    succeeded = submitted(app_deps)
    attempt = app_deps.jobs.claim(succeeded.job_id, worker_id="w", lease=timedelta(minutes=1), max_attempts=MAX)
    assert attempt is not None
    app_deps.jobs.succeed(succeeded.job_id, attempt.attempts, {"analysis": "crop-health"})
    assert body(cancel_job(succeeded.job_id))["code"] == "job_finished"
    assert body(retry_job(succeeded.job_id))["code"] == "not_retryable"
    assert body(cancel_job(uuid.uuid4()))["code"] == "job_not_found"


def test_a_cancel_racing_the_workers_claim_has_one_consistent_outcome(app_deps: Deps) -> None:
    """The API's read, then its event, against a claim at the same moment: either the cancel wins (cancelled, the
    claim finds nothing) or the claim does (running, the cancellation requested, the attempt cannot succeed)."""
    jobs = [submitted(app_deps) for _ in range(12)]
    outcomes = set()
    for job in jobs:
        start = threading.Barrier(2)

        def claim(job: Job = job, start: threading.Barrier = start) -> Job | None:
            start.wait()
            return app_deps.jobs.claim(job.job_id, worker_id="w", lease=timedelta(minutes=1), max_attempts=MAX)

        def cancel_it(job: Job = job, start: threading.Barrier = start) -> tuple[JobStatus, bool]:
            start.wait()
            outcome = cancel(job.job_id, jobs=app_deps.jobs, notifier=app_deps.notifier)
            return outcome.job.status, outcome.pending

        with ThreadPoolExecutor(2) as pool:
            claimed_future, cancelled_future = pool.submit(claim), pool.submit(cancel_it)
            attempt, answer = claimed_future.result(), cancelled_future.result()
        final = app_deps.jobs.get(job.job_id)
        assert final is not None
        if attempt is None:
            assert answer == (JobStatus.CANCELLED, False)
            assert final.status is JobStatus.CANCELLED
        else:
            assert answer == (JobStatus.RUNNING, True)
            assert (final.status, final.cancel_requested_at is not None) == (JobStatus.RUNNING, True)
            assert app_deps.jobs.succeed(job.job_id, attempt.attempts, {}) is None
        outcomes.add(attempt is None)
    assert outcomes  # which side wins varies; every round was consistent


def test_admission_control_on_postgres(environment: Callable[..., Deps]) -> None:
    app = environment(MAX_BACKLOG="1")
    first = post_job(geotiffs.real(), headers={"Idempotency-Key": "full-1"})
    assert first.status_code == 202
    full = post_job(geotiffs.real(geotiffs.RGBN), params={"bands": "B02,B03,B04,B08"})
    assert (full.status_code, body(full)["code"], full.headers["Retry-After"]) == (429, "backlog_full", "2")
    assert post_job(geotiffs.real(), headers={"Idempotency-Key": "full-1"}).status_code == 200
    assert app.jobs.backlog() == 1


def test_dead_letters_list_and_replay(app_deps: Deps, servicebus_emulator: EmulatorHandle) -> None:
    expired = submitted(app_deps)
    assert app_deps.jobs.dead_lettered(expired.job_id, expired.generation, "message_expired", "expired") is not None
    app_deps.jobs.record_dead_letter(letter(expired.job_id, 1, sequence=7, reason="TTLExpiredException",
                                            action="failed"))  # fmt: skip
    app_deps.jobs.record_dead_letter(letter(None, None, sequence=8, reason="Unknown", action="none"))

    listed = body(get_dead_letters({"action": "failed"}))["dead_letters"]
    assert [(d["job_id"], d["job_status"], d["sequence_number"]) for d in listed] == [
        (str(expired.job_id), "failed", 7)
    ]
    assert len(body(get_dead_letters())["dead_letters"]) == 2

    assert body(replay_dead_letters({"reason": "TTLExpiredException"})) == {
        "replayed": [str(expired.job_id)],
        "skipped": 0,
    }
    assert f"{expired.job_id}:2" in peek(servicebus_emulator)
    assert body(replay_dead_letters()) == {"replayed": [], "skipped": 0}
