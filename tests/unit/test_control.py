"""Cancel and retry (``DELETE /api/jobs/{id}``, ``POST /api/jobs/{id}/retry``) on the in-memory backends: every
state, the races between the API's read and its event, and the hand-over of a retried job."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest

from functions import deps
from shared.control import ROUNDS, cancel
from shared.errors import BusUnavailable, DatabaseUnavailable
from shared.jobs import Callback, Job, JobStatus, Priority
from shared.submission import input_blob_name
from tests.contracts.api_store import JobApiStoreContract
from tests.fakes import InMemoryJobStore, RecordingOutbox
from tests.functions_client import body
from tests.job_api_client import cancel_job, retry_job
from tests.jobs import PARAMS, claimed, new_job
from tests.unit.test_functions import World, assert_problem


class Api(World):
    def __init__(self, jobs: InMemoryJobStore | None = None, **environ: str) -> None:
        super().__init__(**environ)
        self.jobs = jobs or self.jobs
        self.outbox = RecordingOutbox()

    def install(self) -> None:
        deps.use(replace(self.deps(), notifier=self.outbox))

    def queued(self, priority: Priority = "normal", callback: Callback | None = None) -> Job:
        job_id = uuid.uuid4()
        job, _ = self.jobs.create(
            job_id=job_id, input_blob=input_blob_name(job_id), input_sha256="0" * 64, params=PARAMS,
            idempotency_key=None, priority=priority, callback=callback,
        )  # fmt: skip
        self.blobs.put_input(job_id, b"image", job.input_sha256)
        return self.jobs.confirm_sent(job.job_id, job.generation) or job

    def running(self) -> Job:
        return claimed(self.jobs, self.queued())

    def failed(self, code: str = "invalid_image") -> Job:
        job = self.running()
        moved = self.jobs.fail(job.job_id, job.attempts, code, "bad input")
        assert moved is not None
        return moved

    def succeeded(self) -> Job:
        job = self.running()
        moved = self.jobs.succeed(job.job_id, job.attempts, {"analysis": "crop-health"})
        assert moved is not None
        return moved


@pytest.fixture
def api() -> Iterator[Api]:
    a = Api()
    a.install()
    yield a
    deps.use(None)


class TestInMemoryJobApiStore(JobApiStoreContract):
    @pytest.fixture
    def store(self) -> InMemoryJobStore:
        return InMemoryJobStore()


# Cancel


def test_cancelling_a_queued_job_answers_200_with_the_cancelled_view_and_flushes_its_webhook(api: Api) -> None:
    job = api.queued()
    response = cancel_job(job.job_id)
    assert response.status_code == 200
    view = body(response)
    assert (view["job_id"], view["status"], view["cancel_requested"]) == (str(job.job_id), "cancelled", False)
    assert "Location" not in response.headers
    assert api.job(job.job_id).status is JobStatus.CANCELLED
    assert api.outbox.flushed == [job.job_id]

    again = cancel_job(job.job_id)  # idempotent: the same answer, nothing moved, nothing flushed
    assert (again.status_code, body(again)["status"]) == (200, "cancelled")
    assert api.outbox.flushed == [job.job_id]


def test_cancelling_a_running_job_requests_it_202_until_the_worker_stops(api: Api) -> None:
    job = api.running()
    response = cancel_job(job.job_id)
    assert response.status_code == 202
    view = body(response)
    assert (view["status"], view["cancel_requested"]) == ("running", True)
    assert response.headers["Location"] == f"/api/jobs/{job.job_id}"
    assert api.outbox.flushed == []  # nothing notifies yet: the worker's stop will

    again = cancel_job(job.job_id)
    assert (again.status_code, body(again)["cancel_requested"]) == (202, True)
    assert api.jobs.succeed(job.job_id, job.attempts, {}) is None  # the attempt can no longer succeed
    assert api.jobs.stop(job.job_id, job.attempts) is not None
    done = cancel_job(job.job_id)
    assert (done.status_code, body(done)["status"]) == (200, "cancelled")


@pytest.mark.parametrize("state", ["succeeded", "failed"])
def test_a_finished_job_cannot_be_cancelled(api: Api, state: str) -> None:
    job = getattr(api, state)()
    problem = assert_problem(cancel_job(job.job_id), 409, "job_finished")
    assert state in str(problem["detail"])
    assert api.job(job.job_id).status.value == state


def test_cancel_of_an_unknown_or_malformed_id(api: Api) -> None:
    assert_problem(cancel_job(uuid.uuid4()), 404, "job_not_found")
    assert_problem(cancel_job("not-a-uuid"), 400, "invalid_job_id")


class ClaimedMeanwhile(InMemoryJobStore):
    """A worker claims the job between the API's read and its ``cancel``."""

    def cancel(self, job_id: uuid.UUID) -> Job | None:
        job = self.get(job_id)
        if job is not None and job.status is JobStatus.QUEUED:
            claimed(self, job)
        return super().cancel(job_id)


class FinishedMeanwhile(InMemoryJobStore):
    """The running attempt succeeds between the API's read and its ``request_cancel``."""

    def request_cancel(self, job_id: uuid.UUID) -> Job | None:
        job = self.get(job_id)
        if job is not None and job.status is JobStatus.RUNNING:
            self.succeed(job_id, job.attempts, {})
        return super().request_cancel(job_id)


class CancelledMeanwhile(InMemoryJobStore):
    """Another request cancels the job between this one's read and its ``cancel``."""

    def cancel(self, job_id: uuid.UUID) -> Job | None:
        super().cancel(job_id)
        return super().cancel(job_id)


def test_a_cancel_that_races_the_workers_claim_requests_the_cancellation_instead() -> None:
    api = Api(ClaimedMeanwhile())
    job = api.queued()
    api.install()
    try:
        response = cancel_job(job.job_id)
    finally:
        deps.use(None)
    assert response.status_code == 202
    now = api.job(job.job_id)
    assert (now.status, now.attempts, now.cancel_requested_at is not None) == (JobStatus.RUNNING, 1, True)
    assert api.jobs.succeed(job.job_id, now.attempts, {}) is None


def test_a_cancel_that_races_the_jobs_success_answers_job_finished() -> None:
    api = Api(FinishedMeanwhile())
    job = api.running()
    api.install()
    try:
        assert_problem(cancel_job(job.job_id), 409, "job_finished")
    finally:
        deps.use(None)
    assert api.job(job.job_id).status is JobStatus.SUCCEEDED


def test_the_loser_of_two_cancels_answers_the_same_and_does_not_flush() -> None:
    api = Api(CancelledMeanwhile())
    job = api.queued()
    outcome = cancel(job.job_id, jobs=api.jobs, notifier=api.outbox)
    assert (outcome.job.status, outcome.pending, api.outbox.flushed) == (JobStatus.CANCELLED, False, [])


class NeverSettles(InMemoryJobStore):
    def cancel(self, job_id: uuid.UUID) -> Job | None:
        self.tries = getattr(self, "tries", 0) + 1
        return None


def test_a_job_that_keeps_moving_is_a_503_to_repeat() -> None:
    api = Api(NeverSettles())
    job = api.queued()
    api.install()
    try:
        response = cancel_job(job.job_id)
    finally:
        deps.use(None)
    assert_problem(response, 503, "job_contended")
    assert response.headers["Retry-After"] == "3"
    assert api.jobs.tries == ROUNDS  # type: ignore[attr-defined]


# Retry


@pytest.mark.parametrize("state", ["failed", "cancelled"])
def test_retry_queues_a_new_generation_and_hands_it_over(api: Api, state: str) -> None:
    job = api.failed() if state == "failed" else api.queued()
    if state == "cancelled":
        job = api.jobs.cancel(job.job_id) or job
    response = retry_job(job.job_id)
    assert response.status_code == 202
    view = body(response)
    assert (view["status"], view["retries"]) == ("queued", 1)
    assert "error" not in view
    assert response.headers["Location"] == f"/api/jobs/{job.job_id}"
    assert response.headers["Retry-After"] == "3"
    now = api.job(job.job_id)
    assert (now.generation, now.sent_at is not None, now.charged) == (job.generation + 1, True, 0)
    assert [m.message_id for m in api.publisher.messages] == [f"{job.job_id}:{job.generation + 1}"]


def test_a_retried_high_priority_job_goes_to_the_high_queue(api: Api) -> None:
    job = api.queued(priority="high")
    api.jobs.cancel(job.job_id)
    assert retry_job(job.job_id).status_code == 202
    [message] = api.publisher.messages
    assert message.priority == "high"


@pytest.mark.parametrize(
    ("state", "code"),
    [("queued", "not_retryable"), ("running", "not_retryable"), ("succeeded", "not_retryable")],
)
def test_only_failed_and_cancelled_jobs_are_retried(api: Api, state: str, code: str) -> None:
    job = getattr(api, state)()
    problem = assert_problem(retry_job(job.job_id), 409, code)
    assert state in str(problem["detail"])
    assert api.job(job.job_id) == job
    assert api.publisher.sent == []


def test_an_enqueue_failed_job_must_be_submitted_again(api: Api) -> None:
    job = new_job(api.jobs)
    api.jobs.abort_submit(job.job_id, job.generation, "enqueue_failed", "could not store the image")
    problem = assert_problem(retry_job(job.job_id), 409, "resubmit_required")
    assert "Idempotency-Key" in str(problem["detail"])


def test_retry_of_an_unknown_job(api: Api) -> None:
    assert_problem(retry_job(uuid.uuid4()), 404, "job_not_found")


def test_a_second_retry_finds_the_job_queued(api: Api) -> None:
    job = api.failed()
    assert retry_job(job.job_id).status_code == 202
    assert_problem(retry_job(job.job_id), 409, "not_retryable")
    assert len(api.publisher.sent) == 1


def test_a_retry_whose_send_fails_still_answers_202_and_leaves_the_job_to_the_reconciler(api: Api) -> None:
    job = api.failed()
    api.publisher.failure = BusUnavailable("emulator down")
    response = retry_job(job.job_id)
    assert response.status_code == 202
    now = api.job(job.job_id)
    assert (now.status, now.generation, now.sent_at) == (JobStatus.QUEUED, job.generation + 1, None)


def test_a_job_whose_image_is_gone_is_retried_all_the_same(api: Api) -> None:
    job = api.failed("input_missing")
    api.blobs.blobs.clear()
    assert retry_job(job.job_id).status_code == 202  # the worker fails it input_missing again


def _summary_unreadable(job_id: uuid.UUID) -> dict[str, object] | None:
    raise DatabaseUnavailable("connection refused at 10.0.0.4")


@pytest.mark.parametrize("action", ["cancel", "retry"])
def test_a_committed_change_is_answered_without_the_webhook_summary_it_could_not_read(api: Api, action: str) -> None:
    """The read after the commit fails: the answer leaves ``webhook`` out instead of a 503 whose repeat would find
    the job moved (a retry's repeat is a 409)."""
    job = api.queued(callback=Callback(url="https://example.com/hook", secret="s"))
    if action == "retry":
        api.jobs.cancel(job.job_id)
    deps.use(replace(deps.get(), webhook_summary=_summary_unreadable))
    response = (retry_job if action == "retry" else cancel_job)(job.job_id)
    assert response.status_code == (202 if action == "retry" else 200)
    view = body(response)
    assert (view["status"], "webhook" in view) == ("queued" if action == "retry" else "cancelled", False)
    assert api.job(job.job_id).status is (JobStatus.QUEUED if action == "retry" else JobStatus.CANCELLED)


def test_database_down_is_a_503(api: Api) -> None:
    api.jobs.failure = DatabaseUnavailable("connection refused at 10.0.0.4")
    for response in (retry_job(uuid.uuid4()), cancel_job(uuid.uuid4())):
        assert_problem(response, 503, "database_unavailable")
        assert b"10.0.0.4" not in response.get_body()
