"""The reconciler on the in-memory job store, blob store and publisher, with a recording dead-letter inbox and a
recording webhook outbox."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from shared.errors import BusUnavailable, DatabaseUnavailable, StorageUnavailable
from shared.jobs import Job, JobStatus
from shared.reconciler import Letter, Policy, Reconciler, Report
from tests.fakes import InMemoryBlobStore, InMemoryJobStore, InMemoryPublisher
from tests.jobs import GONE, claimed, job_record, new_job

MAX = 3
OLD = Policy(resend_after=GONE, max_attempts=MAX, batch=10, abort_after=GONE)  # every unconfirmed job is old enough


class Inbox:
    """The dead-letter sub-queue: ``receive`` hands out each pending letter once; ``complete`` is recorded."""

    def __init__(self) -> None:
        self.pending: list[Letter] = []
        self.completed: list[Letter] = []
        self.asked: list[int] = []

    def receive(self, max_count: int) -> list[Letter]:
        self.asked.append(max_count)
        batch, self.pending = self.pending[:max_count], self.pending[max_count:]
        return batch

    def complete(self, letter: Letter) -> None:
        self.completed.append(letter)


class RecordingOutbox:
    """The webhook outbox: flushes are recorded; ``unsent`` events are what a sweep hands over (and then clears),
    ``stalled`` deliveries what a resume sends again."""

    def __init__(self) -> None:
        self.flushed: list[uuid.UUID] = []
        self.sweeps: list[tuple[timedelta, int]] = []
        self.resumes: list[tuple[timedelta, int]] = []
        self.unsent = 0
        self.stalled = 0
        self.failure: Exception | None = None

    def flush(self, job: Job) -> None:
        self.flushed.append(job.job_id)

    def sweep(self, older_than: timedelta, limit: int) -> int:
        self.sweeps.append((older_than, limit))
        if self.failure is not None:
            raise self.failure
        swept, self.unsent = min(self.unsent, limit), max(0, self.unsent - limit)
        return swept

    def resume(self, older_than: timedelta, limit: int) -> int:
        self.resumes.append((older_than, limit))
        resumed, self.stalled = min(self.stalled, limit), max(0, self.stalled - limit)
        return resumed


class World:
    def __init__(self) -> None:
        self.jobs = InMemoryJobStore()
        self.store = InMemoryBlobStore()
        self.publisher = InMemoryPublisher()
        self.inbox = Inbox()
        self.outbox = RecordingOutbox()
        self._sequence = 0

    def run(self, policy: Policy = OLD) -> Report:
        return Reconciler(self.jobs, self.store, self.publisher, self.inbox, policy, outbox=self.outbox).run()

    def job(self, job: Job) -> Job:
        now = self.jobs.get(job.job_id)
        assert now is not None
        return now

    def stored_job(self) -> Job:
        return new_job(self.jobs, store=self.store)

    def message_ids(self) -> list[str]:
        return [m.message_id for m in self.publisher.messages]

    def letter(self, job: Job | None, reason: str | None, *, generation: int | None = None) -> Letter:
        self._sequence += 1
        job_id = job.job_id if job is not None else None
        generation = generation if generation is not None else (job.generation if job is not None else None)
        letter = Letter(
            message_id=f"{job_id}:{generation}" if job_id else "garbage",
            sequence_number=self._sequence,
            job_id=job_id,
            generation=generation,
            reason=reason,
            description=f"{reason} description",
            delivery_count=5,
            enqueued_at=datetime.now(UTC),
            token=object(),
        )
        self.inbox.pending.append(letter)
        return letter


@pytest.fixture
def world() -> World:
    return World()


def confirmed(world: World, job: Job) -> Job:
    moved = world.jobs.confirm_sent(job.job_id, job.generation)
    assert moved is not None
    return moved


# 1. Unconfirmed sends


def test_an_old_unconfirmed_job_is_sent_as_a_new_generation_and_confirmed(world: World) -> None:
    job = world.stored_job()
    report = world.run()
    now = world.job(job)
    assert (now.status, now.generation) == (JobStatus.QUEUED, 2)
    assert now.sent_at is not None
    assert world.message_ids() == [f"{job.job_id}:2"]  # a new message id: duplicate detection cannot drop it
    assert world.publisher.sent[0][1] is None  # due now
    assert (report.resent, report.changed, report.errors) == (1, 1, [])


def test_a_young_unconfirmed_job_is_left_to_its_submit(world: World) -> None:
    job = world.stored_job()
    report = world.run(Policy(resend_after=timedelta(hours=1), max_attempts=MAX, batch=10, abort_after=GONE))
    assert world.job(job) == job
    assert world.publisher.sent == []
    assert report.changed == 0


def test_a_confirmed_job_is_not_resent(world: World) -> None:
    job = confirmed(world, world.stored_job())
    assert world.run().changed == 0
    assert world.job(job) == job
    assert world.publisher.sent == []


def test_a_never_attempted_job_without_its_image_is_aborted(world: World) -> None:
    job = new_job(world.jobs)  # the submit died before the upload
    report = world.run()
    now = world.job(job)
    assert (now.status, now.error_code) == (JobStatus.FAILED, "enqueue_failed")
    assert world.publisher.sent == []
    assert (report.aborted, report.resent) == (1, 0)


def test_a_submit_that_may_still_be_uploading_is_not_aborted(world: World) -> None:
    job = new_job(world.jobs)  # no image yet: the submit is still uploading it
    report = world.run(Policy(resend_after=GONE, max_attempts=MAX, batch=10, abort_after=timedelta(minutes=10)))
    assert world.job(job) == job
    assert (report.aborted, report.resent, world.publisher.sent) == (0, 0, [])


def test_a_released_job_whose_retry_was_never_sent_is_resent_even_without_checking_its_image(world: World) -> None:
    running = claimed(world.jobs, new_job(world.jobs))  # attempted: never aborted, whatever the image
    released = world.jobs.release(running.job_id, running.attempts)
    assert released is not None
    report = world.run()
    now = world.job(running)
    assert (now.status, now.generation, now.attempts) == (JobStatus.QUEUED, 3, 1)
    assert world.message_ids() == [f"{running.job_id}:3"]
    assert report.resent == 1


# 2. Expired leases, 3. stranded jobs


def test_an_expired_lease_is_requeued_as_a_new_generation_and_sent(world: World) -> None:
    job = claimed(world.jobs, world.stored_job(), lease=GONE)
    report = world.run()
    now = world.job(job)
    assert (now.status, now.generation, now.attempts, now.lease_until) == (JobStatus.QUEUED, 2, 1, None)
    assert now.sent_at is not None
    assert world.message_ids() == [f"{job.job_id}:2"]
    assert report.requeued == 1


def test_a_live_lease_is_left_alone(world: World) -> None:
    job = claimed(world.jobs, world.stored_job())
    assert world.run().changed == 0
    assert world.job(job) == job


def test_an_expired_lease_of_the_last_attempt_is_exhausted(world: World) -> None:
    job = world.stored_job()
    for _ in range(MAX):
        job = claimed(world.jobs, job, lease=GONE, max_attempts=MAX)
    report = world.run()
    now = world.job(job)
    assert (now.status, now.error_code, now.attempts) == (JobStatus.FAILED, "retries_exhausted", MAX)
    assert now.error_message is not None
    assert f"attempt {MAX}" in now.error_message
    assert world.publisher.sent == []
    assert (report.exhausted, report.requeued) == (1, 0)


def test_a_queued_job_no_claim_can_take_is_exhausted(world: World) -> None:
    running = claimed(world.jobs, world.stored_job())
    released = world.jobs.release(running.job_id, running.attempts)
    assert released is not None
    confirmed(world, released)  # its retry is on the bus, but JOB_MAX_ATTEMPTS was lowered to 1 meanwhile
    report = world.run(Policy(resend_after=GONE, max_attempts=1, batch=10, abort_after=GONE))
    now = world.job(running)
    assert (now.status, now.error_code) == (JobStatus.FAILED, "retries_exhausted")
    assert world.publisher.sent == []
    assert report.exhausted == 1


def test_a_stranded_job_whose_send_is_unconfirmed_is_exhausted_without_a_wasted_send(world: World) -> None:
    running = claimed(world.jobs, world.stored_job())
    released = world.jobs.release(running.job_id, running.attempts)
    assert released is not None  # the worker died before sending the retry; the limit is now 1
    report = world.run(Policy(resend_after=GONE, max_attempts=1, batch=10, abort_after=GONE))
    assert world.job(running).status is JobStatus.FAILED
    assert world.publisher.sent == []
    assert (report.resent, report.exhausted) == (0, 1)


# 4. Dead letters


def test_max_delivery_count_of_the_current_generation_redrives_a_queued_job(world: World) -> None:
    job = confirmed(world, world.stored_job())
    letter = world.letter(job, "MaxDeliveryCountExceeded")
    report = world.run()
    now = world.job(job)
    assert (now.status, now.generation) == (JobStatus.QUEUED, 2)
    assert now.sent_at is not None
    assert world.message_ids() == [f"{job.job_id}:2"]
    assert (report.redriven, report.dead_letters) == (1, 1)
    assert world.inbox.completed == [letter]
    assert world.jobs.dead_letters[(letter.message_id, letter.sequence_number)].action == "redrive"


def test_max_delivery_count_of_an_old_generation_changes_nothing(world: World) -> None:
    job = confirmed(world, world.stored_job())
    redriven = world.jobs.redrive(job.job_id, job.generation)
    assert redriven is not None
    newer = confirmed(world, redriven)
    letter = world.letter(job, "MaxDeliveryCountExceeded")  # generation 1, while 2 is on its way
    report = world.run()
    assert world.job(job) == newer
    assert world.publisher.sent == []
    assert (report.redriven, report.dead_letters) == (0, 1)
    assert world.jobs.dead_letters[(letter.message_id, letter.sequence_number)].action == "none"


@pytest.mark.parametrize(
    ("reason", "code"), [("TTLExpiredException", "message_expired"), ("InvalidMessage", "invalid_message")]
)
def test_an_expired_or_poison_message_of_the_current_generation_fails_the_queued_job(
    world: World, reason: str, code: str
) -> None:
    job = confirmed(world, world.stored_job())
    letter = world.letter(job, reason)
    report = world.run()
    now = world.job(job)
    assert (now.status, now.error_code) == (JobStatus.FAILED, code)
    assert now.error_message == f"message dead-lettered ({reason}): {reason} description"
    assert world.publisher.sent == []
    assert (report.dead_lettered_failed, report.dead_letters) == (1, 1)
    assert world.jobs.dead_letters[(letter.message_id, letter.sequence_number)].action == "failed"
    assert world.inbox.completed == [letter]


@pytest.mark.parametrize("reason", ["RetriesExhausted", "TimedOut", "SomethingNew", None])
def test_our_own_and_unknown_dead_letters_change_nothing(world: World, reason: str | None) -> None:
    job = confirmed(world, world.stored_job())
    letter = world.letter(job, reason)
    report = world.run()
    assert world.job(job) == job
    assert report.changed == 0
    assert world.jobs.dead_letters[(letter.message_id, letter.sequence_number)].action == "none"
    assert world.inbox.completed == [letter]


@pytest.mark.parametrize("reason", ["MaxDeliveryCountExceeded", "TTLExpiredException", "InvalidMessage"])
def test_a_dead_letter_of_a_running_job_changes_nothing(world: World, reason: str) -> None:
    job = claimed(world.jobs, confirmed(world, world.stored_job()))  # a later copy is mid-run
    letter = world.letter(job, reason)
    report = world.run()
    assert world.job(job) == job
    assert world.publisher.sent == []
    assert report.changed == 0
    assert world.jobs.dead_letters[(letter.message_id, letter.sequence_number)].action == "none"
    assert world.inbox.completed == [letter]


def test_a_letter_without_a_job_is_recorded_and_completed(world: World) -> None:
    letter = world.letter(None, "InvalidMessage")
    report = world.run()
    assert report.dead_letters == 1
    assert world.jobs.dead_letters[("garbage", letter.sequence_number)].job_id is None
    assert world.inbox.completed == [letter]


def test_every_letter_is_recorded_and_completed(world: World) -> None:
    jobs = [confirmed(world, world.stored_job()) for _ in range(4)]
    reasons = ["MaxDeliveryCountExceeded", "TTLExpiredException", "InvalidMessage", "RetriesExhausted"]
    letters = [world.letter(job, reason) for job, reason in zip(jobs, reasons, strict=True)]
    report = world.run()
    assert world.inbox.completed == letters
    assert world.inbox.asked[0] == OLD.batch
    recorded = world.jobs.dead_letters
    assert [recorded[(x.message_id, x.sequence_number)].action for x in letters] == ["redrive", "failed", "failed",
                                                                                      "none"]  # fmt: skip
    kept = recorded[(letters[0].message_id, letters[0].sequence_number)]
    assert (kept.job_id, kept.generation, kept.reason, kept.delivery_count) == (
        jobs[0].job_id, 1, "MaxDeliveryCountExceeded", 5,
    )  # fmt: skip
    assert (report.dead_letters, report.redriven, report.dead_lettered_failed) == (4, 1, 2)


def test_a_redelivered_letter_is_completed_again_and_recorded_once(world: World) -> None:
    job = confirmed(world, world.stored_job())
    letter = world.letter(job, "TTLExpiredException")
    world.run()
    world.inbox.pending.append(letter)  # the DLQ delivered it again (the completion was lost)
    world.run()
    assert world.inbox.completed == [letter, letter]
    assert len(world.jobs.dead_letters) == 1


def test_a_batch_bounds_each_step(world: World) -> None:
    jobs = [world.stored_job() for _ in range(3)]
    report = world.run(Policy(resend_after=GONE, max_attempts=MAX, batch=2, abort_after=GONE))
    assert report.resent == 2
    assert sum(world.job(j).generation == 2 for j in jobs) == 2
    assert world.run(Policy(resend_after=GONE, max_attempts=MAX, batch=2, abort_after=GONE)).resent == 1


# Failures and idempotency


def test_a_bus_failure_stops_its_step_and_the_others_still_run(world: World, caplog: pytest.LogCaptureFixture) -> None:
    unsent = world.stored_job()
    stranded_run = claimed(world.jobs, world.stored_job())
    stranded = world.jobs.release(stranded_run.job_id, stranded_run.attempts)
    assert stranded is not None
    confirmed(world, stranded)
    expiring = confirmed(world, world.stored_job())
    world.letter(expiring, "TTLExpiredException")
    world.publisher.failure = BusUnavailable("namespace unreachable")
    policy = Policy(resend_after=GONE, max_attempts=1, batch=10, abort_after=GONE)
    report = world.run(policy)
    assert report.errors == ["unconfirmed: bus_unavailable"]
    assert "reconcile_failed" in [getattr(r, "action", None) for r in caplog.records]
    assert (world.job(stranded).status, world.job(expiring).status) == (JobStatus.FAILED, JobStatus.FAILED)
    left = world.job(unsent)
    assert (left.status, left.sent_at) == (JobStatus.QUEUED, None)  # unconfirmed: the next run picks it up
    world.publisher.failure = None
    again = world.run(policy)
    assert again.errors == []
    assert again.resent == 1
    healed = world.job(unsent)
    assert healed.sent_at is not None
    assert world.message_ids() == [f"{unsent.job_id}:{healed.generation}"]


def test_a_bus_failure_during_a_redrive_leaves_the_letter_for_the_next_run(world: World) -> None:
    job = confirmed(world, world.stored_job())
    letter = world.letter(job, "MaxDeliveryCountExceeded")
    world.publisher.failure = BusUnavailable("down")
    report = world.run()
    assert report.errors == ["dead_letters: bus_unavailable"]
    assert world.inbox.completed == []
    assert world.jobs.dead_letters == {}
    left = world.job(job)
    assert (left.status, left.generation, left.sent_at) == (JobStatus.QUEUED, 2, None)
    world.publisher.failure = None
    world.inbox.pending.append(letter)  # its lock ran out: the DLQ delivers it again
    again = world.run()
    assert again.errors == []
    assert world.inbox.completed == [letter]
    assert world.jobs.dead_letters[(letter.message_id, letter.sequence_number)].action == "none"  # old generation
    assert world.job(job).sent_at is not None  # resent by the unconfirmed step instead
    assert world.message_ids() == [f"{job.job_id}:3"]


def test_a_storage_failure_stops_the_unconfirmed_step(world: World) -> None:
    job = new_job(world.jobs)
    world.store.failure = StorageUnavailable("throttled")
    report = world.run()
    assert report.errors == ["unconfirmed: storage_unavailable"]
    assert world.job(job) == job  # neither aborted nor resent


def test_a_database_outage_stops_every_step(world: World) -> None:
    job = world.stored_job()
    world.letter(job, "MaxDeliveryCountExceeded")
    world.jobs.failure = DatabaseUnavailable("connection refused")
    report = world.run()
    assert report.errors == [
        "unconfirmed: database_unavailable",
        "expired: database_unavailable",
        "stranded: database_unavailable",
        "dead_letters: database_unavailable",
        "backlog: database_unavailable",
    ]  # the recording outbox has no database: its sweep ran and found nothing
    assert world.inbox.completed == []
    assert world.publisher.sent == []
    world.jobs.failure = None
    assert world.job(job) == job


def test_a_second_run_changes_nothing(world: World, caplog: pytest.LogCaptureFixture) -> None:
    jobs = {
        "unsent": world.stored_job(),
        "no image": new_job(world.jobs),
        "expired": claimed(world.jobs, world.stored_job(), lease=GONE),
        "live": claimed(world.jobs, world.stored_job()),
        "dead-lettered": confirmed(world, world.stored_job()),
        "redriven": confirmed(world, world.stored_job()),
    }
    world.letter(jobs["dead-lettered"], "TTLExpiredException")
    world.letter(jobs["redriven"], "MaxDeliveryCountExceeded")
    with caplog.at_level(logging.INFO, logger="shared.reconciler"):
        first = world.run()
    assert (first.resent, first.aborted, first.requeued, first.redriven, first.dead_lettered_failed) == (1, 1, 1, 1, 1)
    after = {name: world.job(job) for name, job in jobs.items()}
    sent = list(world.publisher.sent)
    with caplog.at_level(logging.INFO, logger="shared.reconciler"):
        second = world.run()
    assert second == Report()
    assert {name: world.job(job) for name, job in jobs.items()} == after
    assert world.publisher.sent == sent
    reconciled = [r for r in caplog.records if getattr(r, "action", None) == "reconciled"]
    assert [(r.levelno, getattr(r, "changed", None)) for r in reconciled] == [
        (logging.WARNING, 5), (logging.INFO, 0),
    ]  # fmt: skip


def test_a_letter_for_an_unknown_job_changes_nothing(world: World) -> None:
    letter = world.letter(job_record(JobStatus.QUEUED, job_id=uuid.uuid4(), generation=1), "TTLExpiredException")
    report = world.run()
    assert (report.changed, report.dead_letters, report.errors) == (0, 1, [])
    assert world.inbox.completed == [letter]


# Cancellation, webhook events


def cancelling(world: World, *, lease: timedelta = GONE) -> Job:
    """A running job whose cancellation was requested (its attempt has not stopped)."""
    job = claimed(world.jobs, world.stored_job(), lease=lease)
    moved = world.jobs.request_cancel(job.job_id)
    assert moved is not None
    return moved


def test_a_job_being_cancelled_whose_lease_ran_out_is_cancelled_and_notified(world: World) -> None:
    job = cancelling(world)
    report = world.run()
    now = world.job(job)
    assert (now.status, now.lease_until) == (JobStatus.CANCELLED, None)
    assert now.finished_at is not None
    assert world.publisher.sent == []  # neither requeued nor exhausted
    assert (report.cancelled, report.requeued, report.exhausted, report.errors) == (1, 0, 0, [])
    assert world.outbox.flushed == [job.job_id]


def test_a_job_being_cancelled_on_its_last_attempt_is_cancelled_not_exhausted(world: World) -> None:
    job = world.stored_job()
    for _ in range(MAX):
        job = claimed(world.jobs, job, lease=GONE, max_attempts=MAX)
    assert world.jobs.request_cancel(job.job_id) is not None
    report = world.run()
    assert (world.job(job).status, world.job(job).error_code) == (JobStatus.CANCELLED, None)
    assert (report.cancelled, report.exhausted) == (1, 0)


def test_a_job_being_cancelled_with_a_live_lease_is_left_to_its_attempt(world: World) -> None:
    job = cancelling(world, lease=timedelta(minutes=5))
    report = world.run()
    assert world.job(job) == job
    assert (report.changed, world.outbox.flushed) == (0, [])


def test_jobs_the_reconciler_fails_are_notified_and_those_it_requeues_are_not(world: World) -> None:
    requeued = claimed(world.jobs, world.stored_job(), lease=GONE)
    exhausted = world.stored_job()
    for _ in range(MAX):
        exhausted = claimed(world.jobs, exhausted, lease=GONE, max_attempts=MAX)
    expired_message = confirmed(world, world.stored_job())
    world.letter(expired_message, "TTLExpiredException")
    redriven = confirmed(world, world.stored_job())
    world.letter(redriven, "MaxDeliveryCountExceeded")
    report = world.run()
    assert (report.requeued, report.exhausted, report.dead_lettered_failed, report.redriven) == (1, 1, 1, 1)
    assert world.outbox.flushed == [exhausted.job_id, expired_message.job_id]
    assert requeued.job_id not in world.outbox.flushed


def test_a_stranded_job_is_notified(world: World) -> None:
    running = claimed(world.jobs, world.stored_job())
    released = world.jobs.release(running.job_id, running.attempts)
    assert released is not None
    confirmed(world, released)
    world.run(Policy(resend_after=GONE, max_attempts=1, batch=10, abort_after=GONE))
    assert world.outbox.flushed == [running.job_id]


def test_events_left_unsent_are_swept_in_batches(world: World) -> None:
    world.outbox.unsent = 3
    policy = Policy(resend_after=GONE, max_attempts=MAX, batch=2, abort_after=GONE, events_after=timedelta(seconds=7))
    first = world.run(policy)
    assert (first.events_sent, first.changed) == (2, 2)
    assert world.outbox.sweeps == [(timedelta(seconds=7), 2)]
    assert world.run(policy).events_sent == 1
    assert world.run(policy) == Report()


def test_the_default_sweep_waits_30_seconds_for_the_notifier(world: World) -> None:
    world.run()
    assert world.outbox.sweeps == [(timedelta(seconds=30), OLD.batch)]


def test_stalled_webhook_deliveries_are_resumed_in_batches(world: World) -> None:
    world.outbox.stalled = 3
    policy = Policy(resend_after=GONE, max_attempts=MAX, batch=2, abort_after=GONE,
                    events_stalled_after=timedelta(minutes=3))  # fmt: skip
    first = world.run(policy)
    assert (first.events_resumed, first.changed) == (2, 2)
    assert world.outbox.resumes == [(timedelta(minutes=3), 2)]
    assert world.run(policy).events_resumed == 1
    assert world.run(policy) == Report()


def test_a_delivery_is_stalled_past_the_default_longest_backoff_and_a_margin(world: World) -> None:
    world.run()
    assert world.outbox.resumes == [(timedelta(minutes=15), OLD.batch)]


def test_a_failed_sweep_is_reported_and_the_other_steps_still_run(world: World) -> None:
    job = world.stored_job()
    world.outbox.failure = BusUnavailable("down")
    report = world.run()
    assert report.errors == ["events: bus_unavailable"]
    assert report.resent == 1
    assert world.job(job).sent_at is not None
