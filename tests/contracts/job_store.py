"""The JobStore contract: every event from every state, its guards, and its races.

Subclass :class:`JobStoreContract` and provide a ``store`` fixture (real PostgreSQL in tests/integration, the
in-memory fake in tests/unit). The expected outcomes are written out here, independently of
:mod:`shared.lifecycle`'s table, so that a wrong table or a wrong guard fails.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest

from shared.jobs import Callback, IdempotencyConflict, Job, JobFilter, JobStatus, JobStore, NewJob
from shared.lifecycle import Event, target

SHA_A = "a" * 64
SHA_B = "b" * 64
PARAMS: dict[str, Any] = {"bands": ["B04", "B08"], "scale": 10000.0, "analysis": "crop-health"}
LEASE = timedelta(minutes=5)
GONE = timedelta(seconds=-1)  # a lease that has already run out; an age every job has reached
MAX = 5


def create(
    store: JobStore, *, key: str | None = None, sha256: str = SHA_A, params: dict[str, Any] | None = None
) -> tuple[Job, bool]:
    job_id = uuid.uuid4()
    return store.create(
        job_id=job_id, input_blob=f"{job_id}/input.tif", input_sha256=sha256, params=params or PARAMS,
        idempotency_key=key,
    )  # fmt: skip


def _new_job() -> NewJob:
    job_id = uuid.uuid4()
    return NewJob(job_id=job_id, input_blob=f"{job_id}/input.tif", input_sha256=SHA_A, params=PARAMS)


def _batch(store: JobStore, size: int = 3) -> tuple[list[Job], uuid.UUID]:
    batch_id = uuid.uuid4()
    return store.create_batch(batch_id, [_new_job() for _ in range(size)], None)[0], batch_id


def _now(store: JobStore, job_id: uuid.UUID) -> Job:
    job = store.get(job_id)
    assert job is not None
    return job


def claimed(store: JobStore, job: Job, *, lease: timedelta = LEASE, worker: str = "w1") -> Job:
    moved = store.claim(job.job_id, worker_id=worker, lease=lease, max_attempts=MAX)
    assert moved is not None
    return moved


# The fixture states every event is tried from.
def _queued(store: JobStore) -> Job:
    return create(store)[0]


def _queued_sent(store: JobStore) -> Job:
    job = create(store)[0]
    moved = store.confirm_sent(job.job_id, job.generation)
    assert moved is not None
    return moved


def _running(store: JobStore) -> Job:
    return claimed(store, _queued_sent(store))


def _running_expired(store: JobStore) -> Job:
    return claimed(store, _queued_sent(store), lease=GONE)


def _succeeded(store: JobStore) -> Job:
    job = _running(store)
    moved = store.succeed(job.job_id, job.attempts, {"x": 1})
    assert moved is not None
    return moved


def _failed(store: JobStore) -> Job:
    job = _running(store)
    moved = store.fail(job.job_id, job.attempts, "invalid_image", "not a GeoTIFF")
    assert moved is not None
    return moved


def _failed_enqueue(store: JobStore) -> Job:
    job = create(store)[0]
    moved = store.abort_submit(job.job_id, job.generation, "enqueue_failed", "could not store the image")
    assert moved is not None
    return moved


def _cancelled(store: JobStore) -> Job:
    job = _queued_sent(store)
    moved = store.cancel(job.job_id)
    assert moved is not None
    return moved


def _cancelling(store: JobStore) -> Job:
    job = _running(store)
    moved = store.request_cancel(job.job_id)
    assert moved is not None
    return moved


def _cancelling_expired(store: JobStore) -> Job:
    job = _running_expired(store)
    moved = store.request_cancel(job.job_id)
    assert moved is not None
    return moved


STATES: dict[str, Callable[[JobStore], Job]] = {
    "queued": _queued,
    "queued_sent": _queued_sent,
    "running": _running,
    "running_expired": _running_expired,
    "succeeded": _succeeded,
    "failed": _failed,
    "failed_enqueue": _failed_enqueue,
    "cancelled": _cancelled,
    "cancelling": _cancelling,
    "cancelling_expired": _cancelling_expired,
}

# Each event with the arguments of an actor whose view of the job is current (its generation, its attempt).
CALLS: dict[Event, Callable[[JobStore, Job], Job | None]] = {
    Event.CONFIRM_SENT: lambda s, j: s.confirm_sent(j.job_id, j.generation),
    Event.ABORT_SUBMIT: lambda s, j: s.abort_submit(j.job_id, j.generation, "enqueue_failed", "no image"),
    Event.RESUBMIT: lambda s, j: s.resubmit(j.job_id),
    Event.CLAIM: lambda s, j: s.claim(j.job_id, worker_id="w2", lease=LEASE, max_attempts=MAX),
    Event.RENEW_LEASE: lambda s, j: s.renew_lease(j.job_id, j.attempts, LEASE),
    Event.SUCCEED: lambda s, j: s.succeed(j.job_id, j.attempts, {"y": 2}),
    Event.FAIL: lambda s, j: s.fail(j.job_id, j.attempts, "timed_out", "too long"),
    Event.RELEASE: lambda s, j: s.release(j.job_id, j.attempts),
    Event.CANCEL: lambda s, j: s.cancel(j.job_id),
    Event.RESEND: lambda s, j: s.resend(j.job_id, j.generation, GONE),
    Event.EXPIRE: lambda s, j: s.expire(j.job_id, MAX),
    Event.EXHAUST: lambda s, j: s.exhaust(j.job_id, 1, "no attempt left"),
    Event.REDRIVE: lambda s, j: s.redrive(j.job_id, j.generation),
    Event.DEAD_LETTERED: lambda s, j: s.dead_lettered(j.job_id, j.generation, "message_expired", "expired"),
    Event.REQUEST_CANCEL: lambda s, j: s.request_cancel(j.job_id),
    Event.STOP: lambda s, j: s.stop(j.job_id, j.attempts),
    Event.CANCEL_EXPIRED: lambda s, j: s.cancel_expired(j.job_id),
    Event.RETRY: lambda s, j: s.retry(j.job_id),
    Event.PROGRESS: lambda s, j: s.progress(j.job_id, j.attempts, {"stage": "indices", "fraction": 0.5}),
}


def race(store: JobStore, job: Job, events: list[Event]) -> list[Job | None]:
    """Each event in its own thread, all released at once; the outcomes in the order of ``events``."""
    start = threading.Barrier(len(events))

    def call(event: Event) -> Job | None:
        start.wait(timeout=10)
        return CALLS[event](store, job)

    with ThreadPoolExecutor(len(events)) as pool:
        return list(pool.map(call, events))


# Where each event moves a job, from the fixture states it is allowed in (absent: it changes nothing).
EXPECTED: dict[Event, dict[str, JobStatus]] = {
    Event.CONFIRM_SENT: {"queued": JobStatus.QUEUED},
    Event.ABORT_SUBMIT: {"queued": JobStatus.FAILED},
    Event.RESUBMIT: {"failed_enqueue": JobStatus.QUEUED},
    Event.CLAIM: {"queued": JobStatus.RUNNING, "queued_sent": JobStatus.RUNNING, "running_expired": JobStatus.RUNNING},
    Event.RENEW_LEASE: {
        s: JobStatus.RUNNING for s in ("running", "running_expired", "cancelling", "cancelling_expired")
    },
    Event.SUCCEED: {"running": JobStatus.SUCCEEDED, "running_expired": JobStatus.SUCCEEDED},
    Event.FAIL: {s: JobStatus.FAILED for s in ("running", "running_expired", "cancelling", "cancelling_expired")},
    Event.RELEASE: {"running": JobStatus.QUEUED, "running_expired": JobStatus.QUEUED},
    Event.CANCEL: {"queued": JobStatus.CANCELLED, "queued_sent": JobStatus.CANCELLED},
    Event.RESEND: {"queued": JobStatus.QUEUED},
    Event.EXPIRE: {"running_expired": JobStatus.QUEUED},
    Event.EXHAUST: {"running_expired": JobStatus.FAILED},
    Event.REDRIVE: {"queued": JobStatus.QUEUED, "queued_sent": JobStatus.QUEUED},
    Event.DEAD_LETTERED: {"queued": JobStatus.FAILED, "queued_sent": JobStatus.FAILED},
    Event.REQUEST_CANCEL: {"running": JobStatus.RUNNING, "running_expired": JobStatus.RUNNING},
    Event.STOP: {"cancelling": JobStatus.CANCELLED, "cancelling_expired": JobStatus.CANCELLED},
    Event.CANCEL_EXPIRED: {"cancelling_expired": JobStatus.CANCELLED},
    Event.RETRY: {"failed": JobStatus.QUEUED, "cancelled": JobStatus.QUEUED},
    Event.PROGRESS: {s: JobStatus.RUNNING for s in ("running", "running_expired", "cancelling", "cancelling_expired")},
}


class JobStoreContract:
    # Creating and reading

    def test_create_returns_a_queued_job_with_an_unconfirmed_first_generation(self, store: JobStore) -> None:
        job, created = create(store)
        assert created
        assert (job.status, job.generation, job.sent_at, job.attempts) == (JobStatus.QUEUED, 1, None, 0)
        assert (job.params, job.result, job.error_code, job.lease_until) == (PARAMS, None, None, None)
        assert job.created_at.tzinfo is not None
        assert store.get(job.job_id) == job

    def test_get_unknown_is_none(self, store: JobStore) -> None:
        assert store.get(uuid.uuid4()) is None

    def test_same_key_same_bytes_is_the_existing_job(self, store: JobStore) -> None:
        first, created = create(store, key="k-1")
        again, created_again = create(store, key="k-1")
        assert (created, created_again) == (True, False)
        assert again == first

    def test_same_key_other_bytes_conflicts(self, store: JobStore) -> None:
        first, _ = create(store, key="k-2")
        with pytest.raises(IdempotencyConflict) as e:
            create(store, key="k-2", sha256=SHA_B)
        assert e.value.existing.job_id == first.job_id

    def test_same_key_same_bytes_other_options_conflicts(self, store: JobStore) -> None:
        first, _ = create(store, key="k-3")
        with pytest.raises(IdempotencyConflict) as e:
            create(store, key="k-3", params={**PARAMS, "scale": 2 * PARAMS["scale"]})
        assert e.value.existing.job_id == first.job_id

    def test_jobs_without_a_key_never_collide(self, store: JobStore) -> None:
        a, _ = create(store)
        b, _ = create(store)
        assert a.job_id != b.job_id

    def test_ping(self, store: JobStore) -> None:
        store.ping()

    # Every event from every state

    @pytest.mark.parametrize("state", sorted(STATES))
    @pytest.mark.parametrize("event", list(Event), ids=str)
    def test_event_from_state(self, store: JobStore, event: Event, state: str) -> None:
        job = STATES[state](store)
        before = store.get(job.job_id)
        moved = CALLS[event](store, job)
        expected = EXPECTED[event].get(state)
        if expected is None:
            assert moved is None
            assert store.get(job.job_id) == before, "a refused event changes nothing"
        else:
            assert moved is not None
            assert moved.status is expected
            assert store.get(job.job_id) == moved
            assert moved.updated_at >= job.updated_at

    @pytest.mark.parametrize("event", list(Event), ids=str)
    def test_the_table_allows_what_the_store_does(self, event: Event) -> None:
        """Consistency of lifecycle.target with the outcomes above (a guard may refuse more, never allow more)."""
        for state, expected in EXPECTED[event].items():
            assert target(STATES_STATUS[state], event) is expected

    @pytest.mark.parametrize("event", list(Event), ids=str)
    def test_unknown_job_moves_nowhere(self, store: JobStore, event: Event) -> None:
        ghost = _queued(store).model_copy(update={"job_id": uuid.uuid4()})
        assert CALLS[event](store, ghost) is None

    # Guards: a stale view moves nothing

    @pytest.mark.parametrize(
        "event", [Event.RENEW_LEASE, Event.SUCCEED, Event.FAIL, Event.RELEASE, Event.PROGRESS], ids=str
    )
    def test_a_stale_attempt_is_fenced_off(self, store: JobStore, event: Event) -> None:
        first = _running_expired(store)
        second = claimed(store, first, worker="w2")  # the lease ran out: another worker took over
        assert second.attempts == first.attempts + 1
        assert CALLS[event](store, first) is None
        assert store.get(first.job_id) == second

    @pytest.mark.parametrize(
        "event", [Event.CONFIRM_SENT, Event.ABORT_SUBMIT, Event.RESEND, Event.REDRIVE, Event.DEAD_LETTERED], ids=str
    )
    def test_an_old_generation_is_fenced_off(self, store: JobStore, event: Event) -> None:
        job = _queued(store)
        newer = store.resend(job.job_id, job.generation, GONE)
        assert newer is not None
        assert newer.generation == job.generation + 1
        assert CALLS[event](store, job) is None
        assert store.get(job.job_id) == newer

    def test_claim_of_a_live_lease_is_refused(self, store: JobStore) -> None:
        job = _running(store)
        assert store.claim(job.job_id, worker_id="w2", lease=LEASE, max_attempts=MAX) is None
        assert store.expire(job.job_id, MAX) is None
        assert store.exhaust(job.job_id, 1, "x") is None

    def test_claim_counts_attempts_up_to_the_limit(self, store: JobStore) -> None:
        job = _queued(store)
        for attempt in range(1, 4):
            running = store.claim(job.job_id, worker_id="w", lease=GONE, max_attempts=3)
            assert running is not None
            assert (running.attempts, running.worker_id) == (attempt, "w")
        assert store.claim(job.job_id, worker_id="w", lease=GONE, max_attempts=3) is None
        assert store.expire(job.job_id, 3) is None
        exhausted = store.exhaust(job.job_id, 3, "3 attempts")
        assert exhausted is not None
        assert (exhausted.status, exhausted.error_code, exhausted.lease_until) == (
            JobStatus.FAILED, "retries_exhausted", None,
        )  # fmt: skip

    def test_claim_confirms_the_send(self, store: JobStore) -> None:
        job = _queued(store)
        running = claimed(store, job)
        assert running.sent_at is not None
        assert running.lease_until is not None
        assert running.started_at is not None

    def test_succeed_stores_the_result_of_its_attempt(self, store: JobStore) -> None:
        job = _running(store)
        done = store.succeed(job.job_id, job.attempts, {"valid_fraction": 0.5})
        assert done is not None
        assert (done.status, done.result, done.lease_until) == (JobStatus.SUCCEEDED, {"valid_fraction": 0.5}, None)
        assert done.finished_at is not None
        assert store.succeed(job.job_id, job.attempts, {"valid_fraction": 0.9}) is None
        assert store.get(job.job_id) == done

    def test_release_hands_over_a_new_generation(self, store: JobStore) -> None:
        job = _running(store)
        released = store.release(job.job_id, job.attempts)
        assert released is not None
        assert (released.status, released.generation, released.sent_at, released.lease_until) == (
            JobStatus.QUEUED, job.generation + 1, None, None,
        )  # fmt: skip
        assert released.attempts == job.attempts  # the count stays: attempt numbers never repeat
        again = claimed(store, released)
        assert again.attempts == job.attempts + 1

    def test_a_drained_attempt_is_not_charged(self, store: JobStore) -> None:
        job = _queued(store)
        first = store.claim(job.job_id, worker_id="evicted", lease=LEASE, max_attempts=1)
        assert first is not None
        drained = store.release(job.job_id, first.attempts, drain=True)
        assert drained is not None
        assert (drained.attempts, drained.drains, drained.charged) == (1, 1, 0)
        assert store.stranded(1, 10) == []
        second = store.claim(job.job_id, worker_id="w", lease=LEASE, max_attempts=1)
        assert second is not None
        assert (second.attempts, second.charged) == (2, 1)  # attempt numbers still never repeat
        failed = store.release(job.job_id, second.attempts)
        assert failed is not None
        assert failed.charged == 1
        assert store.claim(job.job_id, worker_id="w", lease=LEASE, max_attempts=1) is None
        assert [j.job_id for j in store.stranded(1, 10)] == [job.job_id]

    def test_resend_waits_for_the_age(self, store: JobStore) -> None:
        job = _queued(store)
        assert store.resend(job.job_id, job.generation, timedelta(hours=1)) is None
        assert store.unsent(timedelta(hours=1), 10) == []
        assert [j.job_id for j in store.unsent(GONE, 10)] == [job.job_id]

    def test_abort_submit_only_before_any_attempt(self, store: JobStore) -> None:
        job = _queued(store)
        running = store.claim(job.job_id, worker_id="w", lease=LEASE, max_attempts=MAX)
        assert running is not None
        released = store.release(running.job_id, running.attempts)
        assert released is not None
        assert store.abort_submit(released.job_id, released.generation, "enqueue_failed", "x") is None

    def test_resubmit_clears_the_error(self, store: JobStore) -> None:
        job = _failed_enqueue(store)
        again = store.resubmit(job.job_id)
        assert again is not None
        assert (again.status, again.error_code, again.error_message, again.generation) == (
            JobStatus.QUEUED, None, None, job.generation + 1,
        )  # fmt: skip
        assert store.resubmit(job.job_id) is None

    def test_resubmit_of_a_job_failed_otherwise_is_refused(self, store: JobStore) -> None:
        job = _failed(store)
        assert store.resubmit(job.job_id) is None

    # Cancel, retry, progress

    def test_a_cancelled_attempt_stores_no_result_and_cannot_be_released(self, store: JobStore) -> None:
        job = _cancelling(store)
        assert job.cancel_requested_at is not None
        assert store.request_cancel(job.job_id) is None  # requested once
        assert store.succeed(job.job_id, job.attempts, {"x": 1}) is None
        assert store.release(job.job_id, job.attempts) is None
        stopped = store.stop(job.job_id, job.attempts)
        assert stopped is not None
        assert (stopped.status, stopped.result, stopped.lease_until) == (JobStatus.CANCELLED, None, None)

    def test_a_vanished_cancelling_attempt_is_cancelled_not_requeued(self, store: JobStore) -> None:
        job = _cancelling_expired(store)
        assert store.claim(job.job_id, worker_id="w2", lease=LEASE, max_attempts=MAX) is None
        assert store.expire(job.job_id, MAX) is None
        assert store.exhaust(job.job_id, 1, "x") is None
        assert [j.job_id for j in store.expired(10)] == [job.job_id]
        cancelled = store.cancel_expired(job.job_id)
        assert cancelled is not None
        assert cancelled.status is JobStatus.CANCELLED

    def test_retry_forgives_past_attempts_and_hands_over_a_new_generation(self, store: JobStore) -> None:
        job = _queued(store)
        for _ in range(2):
            assert store.claim(job.job_id, worker_id="w", lease=GONE, max_attempts=2) is not None
        exhausted = store.exhaust(job.job_id, 2, "2 attempts")
        assert exhausted is not None
        again = store.retry(job.job_id)
        assert again is not None
        assert (again.status, again.generation, again.sent_at, again.error_code, again.finished_at) == (
            JobStatus.QUEUED, exhausted.generation + 1, None, None, None,
        )  # fmt: skip
        assert (again.attempts, again.charged, again.retries) == (2, 0, 1)
        assert store.retry(job.job_id) is None  # queued: nothing to retry
        running = store.claim(job.job_id, worker_id="w", lease=LEASE, max_attempts=2)
        assert running is not None
        assert running.attempts == 3  # attempt numbers never repeat

    def test_retry_of_an_enqueue_failed_job_is_refused(self, store: JobStore) -> None:
        assert store.retry(_failed_enqueue(store).job_id) is None

    def test_progress_is_stored_and_cleared_by_the_next_claim(self, store: JobStore) -> None:
        job = _running_expired(store)
        moved = store.progress(job.job_id, job.attempts, {"stage": "decode", "fraction": 0.25}, notify=True)
        assert moved is not None
        assert moved.progress == {"stage": "decode", "fraction": 0.25}
        again = claimed(store, moved, worker="w2")
        assert again.progress is None
        assert again.first_started_at == job.first_started_at is not None

    # Batches, listing, backlog

    def test_a_batch_is_created_whole_in_the_requests_order(self, store: JobStore) -> None:
        batch_id = uuid.uuid4()
        new = [_new_job() for _ in range(8)]  # one transaction, one created_at: only a stored index keeps the order
        order = [n.job_id for n in new]
        jobs, created = store.create_batch(batch_id, new, "batch-key")
        assert created
        assert [j.job_id for j in jobs] == order
        assert {(j.status, j.batch_id) for j in jobs} == {(JobStatus.QUEUED, batch_id)}
        again, created_again = store.create_batch(uuid.uuid4(), [_new_job()], "batch-key")
        assert not created_again
        assert [j.job_id for j in again] == order
        found = store.batch_jobs(batch_id)
        assert found is not None
        assert [j.job_id for j in found] == order
        assert store.batch_jobs(uuid.uuid4()) is None

    def test_a_job_of_a_batch_still_uploading_is_not_retried_until_the_batch_is_sealed(self, store: JobStore) -> None:
        jobs, batch_id = _batch(store)
        ids = [j.job_id for j in jobs]
        cancelled = store.cancel(ids[0])  # cancelled while its batch's submit is still uploading
        assert cancelled is not None
        assert store.retry(ids[0]) is None  # a retry would hand it to the bus before the seal
        assert store.seal_batch(batch_id, ids[1:])
        again = store.retry(ids[0])
        assert again is not None
        assert again.status is JobStatus.QUEUED

    def test_nothing_of_a_batch_is_unsent_before_it_is_sealed(self, store: JobStore) -> None:
        jobs, batch_id = _batch(store)
        ids = [j.job_id for j in jobs]
        single = create(store)[0]
        assert [j.job_id for j in store.unsent(GONE, 100)] == [single.job_id]
        assert store.unsealed(GONE, 10) == [batch_id]
        assert store.unsealed(timedelta(hours=1), 10) == []  # its submit may still be uploading
        assert not store.seal_batch(batch_id, ids[:2])  # a queued job whose image the caller did not store
        assert store.seal_batch(batch_id, ids)
        assert store.seal_batch(batch_id, [])  # sealed before
        assert sorted(j.job_id for j in store.unsent(GONE, 100)) == sorted([single.job_id, *ids])
        assert store.unsealed(GONE, 10) == []
        assert store.abort_batch(batch_id, "too late") == []  # a sealed batch goes ahead
        assert {_now(store, i).status for i in ids} == {JobStatus.QUEUED}
        assert not store.seal_batch(uuid.uuid4(), [])  # no such batch

    def test_an_unsealed_batch_is_aborted_whole_and_sealed_again_only_once_every_job_is_resubmitted(
        self, store: JobStore
    ) -> None:
        jobs, batch_id = _batch(store)
        ids = [j.job_id for j in jobs]
        assert store.abort_batch(batch_id, "dead?", older_than=timedelta(hours=1)) == []  # too recent
        aborted = store.abort_batch(batch_id, "the submit died", older_than=GONE)
        assert [j.job_id for j in aborted] == ids
        assert {(j.status, j.error_code, j.error_message) for j in aborted} == {
            (JobStatus.FAILED, "enqueue_failed", "the submit died")
        }
        assert store.unsealed(GONE, 10) == []  # nothing queued is left
        assert not store.seal_batch(batch_id, ids)
        assert store.resubmit(ids[0]) is not None  # a replay resubmits one job, then dies
        assert not store.seal_batch(batch_id, ids)  # the others are still aborted
        assert [(j.job_id, j.generation) for j in store.abort_batch(batch_id, "the replay died")] == [(ids[0], 2)]
        for job_id in ids:
            assert store.resubmit(job_id) is not None
        assert store.seal_batch(batch_id, ids)
        assert [(_now(store, i).status, _now(store, i).generation) for i in ids] == [
            (JobStatus.QUEUED, 3), (JobStatus.QUEUED, 2), (JobStatus.QUEUED, 2),
        ]  # fmt: skip

    def test_of_a_seal_and_an_abort_one_wins(self, store: JobStore) -> None:
        for _ in range(5):
            jobs, batch_id = _batch(store)
            ids = [j.job_id for j in jobs]
            with ThreadPoolExecutor(2) as pool:
                seal = pool.submit(store.seal_batch, batch_id, ids)
                abort = pool.submit(store.abort_batch, batch_id, "raced")
                sealed, aborted = seal.result(), abort.result()
            assert sealed != bool(aborted)
            assert len(aborted) in (0, len(ids))
            assert {_now(store, i).status for i in ids} == {JobStatus.QUEUED if sealed else JobStatus.FAILED}

    def test_callback_and_priority_are_kept_and_the_secret_is_not_in_the_job(self, store: JobStore) -> None:
        job_id = uuid.uuid4()
        callback = Callback(url="https://example.com/hook", events=["completed", "progress"], secret="whsec_abc")
        job, _ = store.create(
            job_id=job_id, input_blob="x", input_sha256=SHA_A, params=PARAMS, idempotency_key=None,
            priority="high", callback=callback,
        )  # fmt: skip
        assert (job.priority, job.callback_url, job.callback_events) == ("high", callback.url, callback.events)
        assert "whsec_abc" not in job.model_dump_json()
        assert store.webhook_secret(job_id) == "whsec_abc"
        assert store.webhook_secret(uuid.uuid4()) is None

    def test_find_pages_newest_first_with_filters(self, store: JobStore) -> None:
        batch_id = uuid.uuid4()
        jobs, _ = store.create_batch(batch_id, [_new_job() for _ in range(5)], None)
        page1 = store.find(JobFilter(batch_id=batch_id), 2)
        assert len(page1) == 2
        last = page1[-1]
        page2 = store.find(JobFilter(batch_id=batch_id, after=(last.created_at, last.job_id)), 10)
        assert len(page2) == 3
        seen = [j.job_id for j in page1 + page2]
        assert sorted(seen) == sorted(j.job_id for j in jobs)
        keys = [(j.created_at, j.job_id) for j in page1 + page2]
        assert keys == sorted(keys, reverse=True)
        failed = _failed(store)
        assert [j.job_id for j in store.find(JobFilter(status=JobStatus.FAILED), 1000)].count(failed.job_id) == 1
        assert store.find(JobFilter(batch_id=batch_id, status=JobStatus.FAILED), 10) == []
        assert store.find(JobFilter(batch_id=batch_id, analysis="model:other"), 10) == []
        later = store.find(JobFilter(batch_id=batch_id, created_after=jobs[0].created_at), 10)
        assert later == []  # one transaction: one created_at

    def test_backlog_counts_queued_jobs(self, store: JobStore) -> None:
        before = store.backlog()
        _queued(store)
        _running(store)
        assert store.backlog() == before + 1

    # Reconciler queries

    def test_expired_and_stranded_queries(self, store: JobStore) -> None:
        live = _running(store)
        dead = _running_expired(store)
        assert [j.job_id for j in store.expired(10)] == [dead.job_id]
        assert live.job_id not in {j.job_id for j in store.stranded(1, 10)}
        released = store.release(live.job_id, live.attempts)
        assert released is not None
        assert [j.job_id for j in store.stranded(1, 10)] == [live.job_id]
        assert store.stranded(2, 10) == []

    # Races: of two concurrent callers exactly one moves the job

    @pytest.mark.parametrize(
        ("state", "event"),
        [("queued", Event.CLAIM), ("running_expired", Event.CLAIM), ("failed_enqueue", Event.RESUBMIT),
         ("queued", Event.RESEND), ("running_expired", Event.EXPIRE), ("queued", Event.REDRIVE),
         ("queued_sent", Event.CANCEL), ("running", Event.REQUEST_CANCEL), ("running_expired", Event.REQUEST_CANCEL),
         ("failed", Event.RETRY), ("cancelled", Event.RETRY), ("cancelling", Event.STOP),
         ("cancelling_expired", Event.CANCEL_EXPIRED)],
        ids=str,
    )  # fmt: skip
    def test_one_winner(self, store: JobStore, state: str, event: Event) -> None:
        for _ in range(5):
            job = STATES[state](store)
            outcomes = race(store, job, [event] * 8)
            won = [o for o in outcomes if o is not None]
            assert len(won) == 1
            assert won[0].status is EXPECTED[event][state]
            assert store.get(job.job_id) == won[0]

    @pytest.mark.parametrize(
        ("state", "first", "second"),
        [("cancelling_expired", Event.STOP, Event.CANCEL_EXPIRED), ("queued", Event.CANCEL, Event.CLAIM),
         ("queued_sent", Event.CANCEL, Event.CLAIM), ("running", Event.REQUEST_CANCEL, Event.RELEASE),
         ("cancelling", Event.STOP, Event.FAIL)],
        ids=str,
    )  # fmt: skip
    def test_one_of_two_events_wins(self, store: JobStore, state: str, first: Event, second: Event) -> None:
        """Each event alone would move the job, and either one leaves a state the other is refused in."""
        for _ in range(5):
            job = STATES[state](store)
            outcomes = race(store, job, [first, second])
            won = [(e, o) for e, o in zip((first, second), outcomes, strict=True) if o is not None]
            assert len(won) == 1
            event, moved = won[0]
            assert moved.status is EXPECTED[event][state]
            assert store.get(job.job_id) == moved

    def test_succeed_racing_request_cancel(self, store: JobStore) -> None:
        """A requested cancel and the attempt's result: one wins; a cancelled attempt stores no result."""
        for _ in range(5):
            job = _running(store)
            done, cancel = race(store, job, [Event.SUCCEED, Event.REQUEST_CANCEL])
            assert (done is None) != (cancel is None)
            final = store.get(job.job_id)
            assert final is not None
            if cancel is not None:
                assert final == cancel
                assert (final.status, final.result) == (JobStatus.RUNNING, None)
                assert final.cancel_requested_at is not None
                assert CALLS[Event.SUCCEED](store, job) is None  # the attempt's result is refused from now on
                stopped = CALLS[Event.STOP](store, job)
                assert stopped is not None
                assert (stopped.status, stopped.result) == (JobStatus.CANCELLED, None)
            else:
                assert done is not None
                assert final == done
                assert (final.status, final.result, final.cancel_requested_at) == (JobStatus.SUCCEEDED, {"y": 2}, None)
                assert CALLS[Event.REQUEST_CANCEL](store, job) is None

    @pytest.mark.parametrize("state", ["failed", "cancelled"])
    def test_retry_racing_claims_of_an_old_message(self, store: JobStore, state: str) -> None:
        """A redelivered message of the old generation claims while the job is retried. A claim never moves a
        failed or cancelled job, so one that wins ran after the retry: it took the retried job's new generation."""
        for _ in range(5):
            job = STATES[state](store)
            outcomes = race(store, job, [Event.RETRY, Event.RETRY, Event.CLAIM, Event.CLAIM])
            retried = [o for o in outcomes[:2] if o is not None]
            claims = [o for o in outcomes[2:] if o is not None]
            assert len(retried) == 1  # its status is not asserted: PostgresJobStore reads the moved row back after
            # the commit, so a claim that followed may already show in it
            assert (retried[0].generation, retried[0].retries) == (job.generation + 1, 1)
            assert len(claims) <= 1
            final = store.get(job.job_id)
            assert final is not None
            if claims:
                assert final == claims[0]
                assert (final.status, final.attempts) == (JobStatus.RUNNING, job.attempts + 1)
                assert (final.generation, final.retries, final.charged) == (job.generation + 1, 1, 1)
            else:
                assert final == retried[0]
                assert (final.status, final.attempts, final.charged) == (JobStatus.QUEUED, job.attempts, 0)

    def test_claims_racing_expire_start_one_attempt(self, store: JobStore) -> None:
        """The reconciler re-queues an expired attempt while two redeliveries claim: one new attempt, never two."""
        for _ in range(5):
            job = _running_expired(store)
            with ThreadPoolExecutor(3) as pool:
                claims = [pool.submit(CALLS[Event.CLAIM], store, job) for _ in range(2)]
                expire = pool.submit(CALLS[Event.EXPIRE], store, job)
                won = [c.result() for c in claims if c.result() is not None]
                expired = expire.result()
            assert len(won) <= 1
            final = store.get(job.job_id)
            assert final is not None
            if won:
                assert (final.status, final.attempts) == (JobStatus.RUNNING, job.attempts + 1)
            else:
                assert expired is not None
                assert (final.status, final.attempts) == (JobStatus.QUEUED, job.attempts)


STATES_STATUS: dict[str, JobStatus] = {
    "queued": JobStatus.QUEUED,
    "queued_sent": JobStatus.QUEUED,
    "running": JobStatus.RUNNING,
    "running_expired": JobStatus.RUNNING,
    "succeeded": JobStatus.SUCCEEDED,
    "failed": JobStatus.FAILED,
    "failed_enqueue": JobStatus.FAILED,
    "cancelled": JobStatus.CANCELLED,
    "cancelling": JobStatus.RUNNING,
    "cancelling_expired": JobStatus.RUNNING,
}
