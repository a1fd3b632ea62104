"""The JobRepository contract. Subclass :class:`JobRepositoryContract` and provide a ``repo`` fixture."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest

from shared.jobs import IdempotencyConflict, Job, JobRepository, JobStatus

SHA_A = "a" * 64
SHA_B = "b" * 64
PARAMS: dict[str, Any] = {"bands": ["B04", "B08"], "scale": 10000.0, "analysis": "crop-health"}


def create(repo: JobRepository, *, key: str | None = None, sha256: str = SHA_A) -> tuple[Job, bool]:
    job_id = uuid.uuid4()
    return repo.create(
        job_id=job_id, input_blob=f"{job_id}/input.tif", input_sha256=sha256, params=PARAMS, idempotency_key=key
    )


class JobRepositoryContract:
    def test_create_returns_a_queued_job(self, repo: JobRepository) -> None:
        job, created = create(repo)
        assert created
        assert job.status is JobStatus.QUEUED
        assert job.attempts == 0
        assert job.params == PARAMS
        assert job.result is None
        assert job.error_code is None
        assert job.created_at.tzinfo is not None
        assert repo.get(job.job_id) == job

    def test_get_unknown_is_none(self, repo: JobRepository) -> None:
        assert repo.get(uuid.uuid4()) is None

    def test_same_key_same_bytes_is_the_existing_job(self, repo: JobRepository) -> None:
        first, _ = create(repo, key="k-1")
        again, created = create(repo, key="k-1")
        assert not created
        assert again.job_id == first.job_id

    def test_same_key_other_bytes_conflicts(self, repo: JobRepository) -> None:
        first, _ = create(repo, key="k-2")
        with pytest.raises(IdempotencyConflict) as info:
            create(repo, key="k-2", sha256=SHA_B)
        assert info.value.existing.job_id == first.job_id

    def test_jobs_without_a_key_never_collide(self, repo: JobRepository) -> None:
        a, _ = create(repo)
        b, created = create(repo)
        assert created
        assert a.job_id != b.job_id

    def test_start_attempt_counts_attempts(self, repo: JobRepository) -> None:
        job, _ = create(repo)
        first = repo.start_attempt(job.job_id)
        second = repo.start_attempt(job.job_id)
        assert first is not None
        assert first.status is JobStatus.PROCESSING
        assert first.attempts == 1
        assert second is not None
        assert second.attempts == 2
        assert second.updated_at >= job.updated_at

    def test_start_attempt_unknown_is_none(self, repo: JobRepository) -> None:
        assert repo.start_attempt(uuid.uuid4()) is None

    def test_succeed_stores_the_result_once(self, repo: JobRepository) -> None:
        job, _ = create(repo)
        repo.start_attempt(job.job_id)
        assert repo.succeed(job.job_id, {"valid_fraction": 0.5})
        assert not repo.succeed(job.job_id, {"valid_fraction": 0.9})  # a redelivery writes nothing
        done = repo.get(job.job_id)
        assert done is not None
        assert done.status is JobStatus.SUCCEEDED
        assert done.result == {"valid_fraction": 0.5}

    def test_start_attempt_on_a_terminal_job_changes_nothing(self, repo: JobRepository) -> None:
        job, _ = create(repo)
        repo.start_attempt(job.job_id)
        repo.succeed(job.job_id, {"x": 1})
        again = repo.start_attempt(job.job_id)
        assert again is not None
        assert again.status is JobStatus.SUCCEEDED
        assert again.attempts == 1

    def test_start_attempt_runs_a_job_whose_failed_send_reached_the_broker(self, repo: JobRepository) -> None:
        job, _ = create(repo)
        assert repo.fail(job.job_id, "enqueue_failed", "the message could not be queued")
        started = repo.start_attempt(job.job_id)
        assert started is not None
        assert started.status is JobStatus.PROCESSING
        assert (started.error_code, started.error_message, started.attempts) == (None, None, 1)

    def test_start_attempt_on_a_job_failed_otherwise_changes_nothing(self, repo: JobRepository) -> None:
        job, _ = create(repo)
        assert repo.fail(job.job_id, "invalid_image", "not a GeoTIFF")
        again = repo.start_attempt(job.job_id)
        assert again is not None
        assert (again.status, again.error_code, again.attempts) == (JobStatus.FAILED, "invalid_image", 0)

    def test_fail_records_code_and_message(self, repo: JobRepository) -> None:
        job, _ = create(repo)
        assert repo.fail(job.job_id, "invalid_image", "not a GeoTIFF")
        failed = repo.get(job.job_id)
        assert failed is not None
        assert failed.status is JobStatus.FAILED
        assert (failed.error_code, failed.error_message) == ("invalid_image", "not a GeoTIFF")

    @pytest.mark.parametrize("first", ["succeed", "fail"])
    def test_terminal_jobs_stay_terminal(self, repo: JobRepository, first: str) -> None:
        job, _ = create(repo)
        if first == "succeed":
            repo.succeed(job.job_id, {"x": 1})
        else:
            repo.fail(job.job_id, "invalid_image", "bad")
        before = repo.get(job.job_id)
        assert not repo.fail(job.job_id, "other", "later")
        assert not repo.succeed(job.job_id, {"x": 2})
        after = repo.get(job.job_id)
        assert after is not None
        assert before is not None
        assert (after.status, after.result, after.error_code) == (before.status, before.result, before.error_code)

    def test_unknown_jobs_cannot_succeed_or_fail(self, repo: JobRepository) -> None:
        assert not repo.succeed(uuid.uuid4(), {"x": 1})
        assert not repo.fail(uuid.uuid4(), "code", "message")

    def test_requeue_enqueue_failed_sets_the_job_back_to_queued(self, repo: JobRepository) -> None:
        job, _ = create(repo, key="k-3")
        repo.mark_enqueued(job.job_id)
        repo.fail(job.job_id, "enqueue_failed", "could not queue the job")
        again = repo.requeue_enqueue_failed(job.job_id)
        assert again is not None
        assert (again.status, again.error_code, again.error_message) == (JobStatus.QUEUED, None, None)
        assert again.enqueued_at is None
        assert repo.get(job.job_id) == again
        assert repo.requeue_enqueue_failed(job.job_id) is None  # queued now: nothing to requeue

    @pytest.mark.parametrize("state", ["queued", "processing", "succeeded", "failed-otherwise", "unknown"])
    def test_requeue_enqueue_failed_changes_nothing_else(self, repo: JobRepository, state: str) -> None:
        job, _ = create(repo)
        if state == "processing":
            repo.start_attempt(job.job_id)
        elif state == "succeeded":
            repo.succeed(job.job_id, {"x": 1})
        elif state == "failed-otherwise":
            repo.fail(job.job_id, "invalid_image", "not a GeoTIFF")
        before = repo.get(job.job_id)
        assert repo.requeue_enqueue_failed(uuid.uuid4() if state == "unknown" else job.job_id) is None
        assert repo.get(job.job_id) == before

    def test_requeue_enqueue_failed_has_one_winner(self, repo: JobRepository) -> None:
        job, _ = create(repo)
        repo.fail(job.job_id, "enqueue_failed", "could not queue the job")
        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(lambda _: repo.requeue_enqueue_failed(job.job_id), range(8)))
        assert sum(o is not None for o in outcomes) == 1

    def test_mark_enqueued_records_the_send(self, repo: JobRepository) -> None:
        job, _ = create(repo)
        assert job.enqueued_at is None
        assert repo.mark_enqueued(job.job_id)
        sent = repo.get(job.job_id)
        assert sent is not None
        assert sent.enqueued_at is not None
        assert sent.enqueued_at >= job.created_at
        assert not repo.mark_enqueued(uuid.uuid4())

    def test_stale_unsent_are_queued_never_sent_and_old_enough(self, repo: JobRepository) -> None:
        unsent = [create(repo)[0] for _ in range(3)]
        sent, _ = create(repo)
        repo.mark_enqueued(sent.job_id)
        started, _ = create(repo)
        repo.start_attempt(started.job_id)
        failed, _ = create(repo)
        repo.fail(failed.job_id, "enqueue_failed", "could not store the image")
        found = repo.stale_unsent(timedelta(0), limit=10)
        assert [j.job_id for j in found] == [j.job_id for j in unsent]  # oldest first
        assert [j.job_id for j in repo.stale_unsent(timedelta(0), limit=2)] == [j.job_id for j in unsent[:2]]
        assert repo.stale_unsent(timedelta(hours=1), limit=10) == []  # too recent: the submit may still be sending
