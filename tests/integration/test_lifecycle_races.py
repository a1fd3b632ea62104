"""Interleavings of at-least-once delivery on real backends: PostgreSQL, Azurite, the emulator through the real SDK.

The two reproductions of the lifecycle issue (H1: an ambiguous send left a job queued for ever; H3: one job run
twice at once, result from one run and files from the other) and the races around them: two deliveries at once, an
ambiguous send then a same-key retry, a crash between the result write and the settlement, a lock lost mid-job, the
reconciler racing a late send, a dead letter of an old generation while a later copy runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from azure.servicebus import AutoLockRenewer, ServiceBusReceiver

from gpu_worker.app import run
from gpu_worker.breaker import Breaker
from gpu_worker.consumer import AttemptLimits, Consumer
from gpu_worker.handler import JobHandler
from gpu_worker.heartbeat import Heartbeat
from gpu_worker.inbox import PriorityInbox
from gpu_worker.locks import LostLocks
from gpu_worker.registry import Presence
from gpu_worker.settlement import AttemptLost, RetryPolicy
from gpu_worker.shutdown import Shutdown
from shared.bus import JobPublisher
from shared.errors import BusUnavailable
from shared.events import open_notifier
from shared.geotiff import Limits
from shared.jobs import Job, JobStatus
from shared.messages import JobMessage
from shared.submission import Policy, Upload, submit
from shared.workers import WorkerRegistry
from tests.integration.worker_helpers import FIELDS, RGBN, SlowAnalyzer, StackFactory, WorkerStack
from tests.integration.worker_helpers import stack_factory as stack_factory

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMITS = Limits(100 * 1024 * 1024, 130_000_000, 32)


@pytest.fixture
def stack(stack_factory: StackFactory) -> WorkerStack:
    return stack_factory()


class AmbiguousPublisher:
    """The send reaches the broker, then the SDK reports a failure (a timeout after the broker accepted it)."""

    def __init__(self, inner: JobPublisher) -> None:
        self.inner = inner
        self.sent: list[str] = []

    def send(self, message: JobMessage, *, at: datetime | None = None) -> None:
        self.inner.send(message, at=at)
        self.sent.append(message.message_id)
        raise BusUnavailable("timed out waiting for the broker's disposition")


def _submit(stack: WorkerStack, publisher: object, key: str = "k-1") -> tuple[JobStatus, bool, object]:
    upload = Upload(data=FIELDS.read_bytes(), bands=",".join(RGBN), idempotency_key=key)
    outcome = submit(upload, limits=LIMITS, jobs=stack.jobs, store=stack.store, publisher=publisher)  # type: ignore[arg-type]
    return outcome.job.status, outcome.created, outcome.job.job_id


WorkerFactory = Callable[..., Consumer]


@pytest.fixture
def worker(stack_factory: StackFactory, tmp_path: Path) -> Iterator[WorkerFactory]:
    """``worker(stack, name, analyzer, locks, renewer=None)``: a consumer wired as :func:`gpu_worker.app.run` wires
    it (both job queues, the outbox notifier, a row in ``workers``), on receivers of its own, its messages' locks
    renewed by ``renewer``."""
    receivers: list[ServiceBusReceiver] = []
    presences: list[Presence] = []

    def make(
        stack: WorkerStack, name: str, analyzer: object, locks: LostLocks, renewer: AutoLockRenewer | None = None
    ) -> Consumer:
        settings = stack.settings()
        normal, high = (
            stack.client.get_queue_receiver(queue) for queue in (settings.jobs_queue, settings.jobs_high_queue)
        )
        receivers.extend((normal, high))
        presence = Presence(
            WorkerRegistry(stack.pool), name, "test-host", "cpu", interval=settings.worker_registry_interval
        ).start()
        presences.append(presence)
        return Consumer(
            PriorityInbox(
                normal,
                high,
                burst=settings.worker_high_priority_burst,
                wait=settings.worker_max_wait_time,
                locks=locks,
                renewer=renewer,
            ),
            stack.jobs,
            JobHandler(stack.jobs, stack.store, analyzer),  # type: ignore[arg-type]
            JobPublisher(stack.client, stack.queues),
            Shutdown(30),
            Heartbeat(tmp_path / f"{name}.heartbeat"),
            locks,
            Breaker({"postgres": stack.jobs.ping}, max_interval=1),
            worker_id=name,
            retry=RetryPolicy(settings.job_max_attempts, settings.retry_backoff, settings.retry_backoff_max),
            limits=AttemptLimits(settings.job_lease, settings.job_timeout, 5),
            notifier=open_notifier(stack.pool, stack.client, settings.job_events_queue),
            presence=presence,
            in_flight=settings.worker_jobs_in_flight,
        )

    yield make
    for presence in presences:
        presence.close()
    for receiver in receivers:
        receiver.close()


def test_h1_an_ambiguous_send_leaves_the_job_claimable_and_a_same_key_retry_sends_nothing_new(
    stack: WorkerStack,
) -> None:
    """H1: the send reached the broker but reported failure. The job stays queued (never failed), the worker runs
    it, and the client's same-key retry finds it succeeded; nothing is left for the reconciler."""
    ambiguous = AmbiguousPublisher(JobPublisher(stack.client, stack.queues))
    status, created, job_id = _submit(stack, ambiguous)
    assert (status, created) == (JobStatus.QUEUED, True)  # 202: accepted; the send is the reconciler's if need be
    job = stack.job(job_id)  # type: ignore[arg-type]
    assert (job.status, job.sent_at, job.error_code) == (JobStatus.QUEUED, None, None)

    analyzer = SlowAnalyzer(0)
    run(stack.settings(), analyzer=analyzer, max_jobs=1)
    assert stack.job(job_id).status is JobStatus.SUCCEEDED  # type: ignore[arg-type]

    status, created, _ = _submit(stack, ambiguous)  # the client retries after the error it never saw the end of
    assert (status, created) == (JobStatus.SUCCEEDED, False)
    assert ambiguous.sent == [f"{job_id}:1"]  # the retry sent nothing
    assert stack.reconcile(RECONCILE_RESEND_AFTER="PT0S").changed == 0
    assert (analyzer.calls, stack.queued(), stack.dead_letters()) == (1, [], [])


def test_an_ambiguous_send_then_a_same_key_retry_before_any_worker_runs_the_job_once(stack: WorkerStack) -> None:
    ambiguous = AmbiguousPublisher(JobPublisher(stack.client, stack.queues))
    _, _, job_id = _submit(stack, ambiguous)
    status, created, again = _submit(stack, JobPublisher(stack.client, stack.queues))
    assert (status, created, again) == (JobStatus.QUEUED, False, job_id)
    [message] = stack.queued()  # the retry of the same send was dropped by duplicate detection
    assert message.message_id == f"{job_id}:1"
    assert stack.job(job_id).sent_at is not None  # type: ignore[arg-type]  # the retry confirmed it
    analyzer = SlowAnalyzer(0)
    run(stack.settings(), analyzer=analyzer, max_jobs=1)
    job = stack.job(job_id)  # type: ignore[arg-type]
    assert (job.status, job.attempts, analyzer.calls) == (JobStatus.SUCCEEDED, 1, 1)


def test_the_reconciler_racing_a_late_send_runs_the_job_once(
    stack: WorkerStack, caplog: pytest.LogCaptureFixture
) -> None:
    """The submit's send is late; the reconciler hands over generation 2 meanwhile. Both messages arrive: one
    claims, the other finds the job claimed. One attempt, one result, files under one attempt."""
    message = stack.create_job(FIELDS.read_bytes())  # the submit's send has not happened yet
    report = stack.reconcile(RECONCILE_RESEND_AFTER="PT0S")
    assert report.resent == 1
    stack.send(message)  # the late send of generation 1
    assert sorted(str(m.message_id) for m in stack.queued()) == [f"{message.job_id}:1", f"{message.job_id}:2"]
    analyzer = SlowAnalyzer(0)
    with caplog.at_level(logging.INFO):
        run(stack.settings(), analyzer=analyzer, max_jobs=2)
    job = stack.job(message.job_id)
    assert (job.status, job.attempts, analyzer.calls) == (JobStatus.SUCCEEDED, 1, 1)
    assert [getattr(r, "action", None) for r in caplog.records].count("not_claimed") == 1
    assert (stack.queued(), stack.dead_letters()) == ([], [])


def test_a_confirm_lost_behind_the_answer_then_landing_late_runs_the_job_once(
    stack: WorkerStack, caplog: pytest.LogCaptureFixture
) -> None:
    """The API answers before it records the send (shared.confirmations). Its confirm is lost (the process died with
    it queued): the reconciler resends generation 2; a late confirm of generation 1 (a slow database) then moves
    nothing. Both messages arrive: one claims, the other finds the job claimed. One attempt, one result."""
    from shared.confirmations import confirm_now

    lost: list[Job] = []

    def queued_then_lost(job: Job) -> Job:  # ConfirmBehind.confirm, in a process that then dies
        lost.append(job)
        return job

    upload = Upload(data=FIELDS.read_bytes(), bands=",".join(RGBN))
    publisher = JobPublisher(stack.client, stack.queues)
    outcome = submit(upload, limits=LIMITS, jobs=stack.jobs, store=stack.store,
                     publisher=publisher, policy=Policy(confirm=queued_then_lost))  # fmt: skip
    job_id = outcome.job.job_id
    assert (outcome.created, [j.job_id for j in lost]) == (True, [job_id])  # answered; the confirm never written
    report = stack.reconcile(RECONCILE_RESEND_AFTER="PT0S")
    assert report.resent == 1
    late = confirm_now(lost[0], stack.jobs)  # generation 1's confirm, after the resend: refused by its guard
    assert (late.generation, late.sent_at is not None) == (2, True)  # the resend's own confirm, not this one's
    assert sorted(str(m.message_id) for m in stack.queued()) == [f"{job_id}:1", f"{job_id}:2"]
    analyzer = SlowAnalyzer(0)
    with caplog.at_level(logging.INFO):
        run(stack.settings(), analyzer=analyzer, max_jobs=2)
    job = stack.job(job_id)
    assert (job.status, job.attempts, analyzer.calls) == (JobStatus.SUCCEEDED, 1, 1)
    assert [getattr(r, "action", None) for r in caplog.records].count("not_claimed") == 1
    assert (stack.queued(), stack.dead_letters()) == ([], [])


def test_two_deliveries_at_once_run_the_job_once(
    stack: WorkerStack, worker: WorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Two workers receive two copies of one job at the same moment: one claims and runs it, the other's claim is
    refused by the live lease and its message completed."""
    message = stack.create_job(FIELDS.read_bytes())
    stack.send(message)
    moved = stack.jobs.resend(message.job_id, 1, timedelta(seconds=-1))
    assert moved is not None
    stack.send(JobMessage.for_job(moved))
    analyzer = SlowAnalyzer(2)
    consumers = [worker(stack, name, analyzer, LostLocks()) for name in ("w1", "w2")]
    with caplog.at_level(logging.INFO):
        threads = [threading.Thread(target=c.run, kwargs={"max_jobs": 1}) for c in consumers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    job = stack.job(message.job_id)
    assert (job.status, job.attempts, analyzer.calls) == (JobStatus.SUCCEEDED, 1, 1)
    assert sum(c.settled[a] for c in consumers for a in c.settled) == 2
    assert (stack.queued(), stack.dead_letters()) == ([], [])


def test_h3_a_taken_over_attempt_can_neither_store_its_result_nor_overwrite_the_winners_files(
    stack: WorkerStack,
) -> None:
    """H3: attempt 1 stalls past its lease, attempt 2 takes over and succeeds, then attempt 1 finishes. Its result is
    refused and its files are under its own prefix: the stored result and the files it names are attempt 2's."""
    message = stack.create_job(FIELDS.read_bytes())
    first = stack.jobs.claim(message.job_id, worker_id="stalled", lease=timedelta(seconds=-1), max_attempts=5)
    assert first is not None
    second = stack.jobs.claim(message.job_id, worker_id="healthy", lease=timedelta(minutes=1), max_attempts=5)
    assert second is not None
    assert (first.attempts, second.attempts) == (1, 2)

    class Files:
        def analyse(self, image_path: Path, request: object, workdir: Path) -> object:
            from gpu_worker.analysis import AnalysisOutput

            out = workdir / "ndvi.tif"
            out.write_text(f"written by {workdir}")
            return AnalysisOutput(result={"ran": True}, files={"ndvi": (out, "image/tiff")})

    class Never:
        """Neither checks nor reports: attempt 1 stalled, it never looked."""

        def check(self) -> None:
            pass

        def report(self, stage: str, fraction: float = 0.0) -> None:
            pass

    handler = JobHandler(stack.jobs, stack.store, Files())  # type: ignore[arg-type]

    def run(attempt: Job) -> None:  # the handler's stages, one after the other
        prepared = handler.prepare(attempt, Never(), Never())
        try:
            handler.finish(attempt, handler.analyse(attempt, prepared, Never()), Never(), Never())
        finally:
            prepared.close()

    run(second)
    with pytest.raises(AttemptLost):
        run(first)
    job = stack.job(message.job_id)
    assert job.status is JobStatus.SUCCEEDED
    assert job.result is not None
    assert job.result["attempt"] == 2
    assert job.result["outputs"]["ndvi"].endswith(f"/{message.job_id}/2/ndvi.tif")
    assert stack.results(message.job_id) == {f"{message.job_id}/1/ndvi.tif", f"{message.job_id}/2/ndvi.tif"}


def test_a_crash_between_the_result_write_and_the_settlement_does_not_run_the_job_again(
    stack_factory: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stack = stack_factory({"LockDuration": "PT2S"})
    job_id = stack.submit(FIELDS.read_bytes())
    with stack.client.get_queue_receiver(stack.queue_name) as receiver:
        [message] = receiver.receive_messages(max_message_count=1, max_wait_time=5)
        job = stack.jobs.claim(job_id, worker_id="doomed", lease=timedelta(minutes=1), max_attempts=5)
        assert job is not None
        assert stack.jobs.succeed(job_id, job.attempts, {"by": "the first delivery"}) is not None
        # ... and the process dies here: the message is never settled; its lock runs out.
    analyzer = SlowAnalyzer(0)
    with caplog.at_level(logging.INFO):
        run(stack.settings(), analyzer=analyzer, max_jobs=1)
    done = stack.job(job_id)
    assert (done.status, done.attempts, done.result, analyzer.calls) == (
        JobStatus.SUCCEEDED, 1, {"by": "the first delivery"}, 0,
    )  # fmt: skip
    assert any(getattr(r, "action", None) == "not_claimed" for r in caplog.records)
    assert (stack.queued(), stack.dead_letters()) == ([], [])
    assert message.delivery_count == 0


def test_a_lock_lost_mid_job_lets_the_redelivery_see_the_live_lease(
    stack_factory: StackFactory, worker: WorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Worker A's message lock lapses mid-job (its renewer gives up); the broker redelivers to worker B, whose claim
    is refused because A's lease is alive. A finishes and stores the result; its settlement finds the lock gone."""
    stack = stack_factory({"LockDuration": "PT2S"})
    job_id = stack.submit(FIELDS.read_bytes())
    locks_a = LostLocks()
    renewer = AutoLockRenewer(max_lock_renewal_duration=1, on_lock_renew_failure=locks_a.on_renew_failure)
    analyzer = SlowAnalyzer(6)
    with renewer:
        a = worker(stack, "a", analyzer, locks_a, renewer)
        b = worker(stack, "b", analyzer, LostLocks())
        with caplog.at_level(logging.INFO):
            worker_a = threading.Thread(target=a.run, kwargs={"max_jobs": 1})
            worker_a.start()
            stack.wait_for(job_id, "running")
            time.sleep(2.5)  # past the lock duration: the message is available again
            b.run(max_jobs=1)
            worker_a.join(30)
    job = stack.job(job_id)
    assert (job.status, job.attempts, analyzer.calls) == (JobStatus.SUCCEEDED, 1, 1)
    actions = [getattr(r, "action", None) for r in caplog.records]
    assert "not_claimed" in actions
    assert "leave_lock_lost" in actions
    assert (stack.queued(), stack.dead_letters()) == ([], [])


def test_the_reconciler_requeues_an_expired_lease_with_no_worker_running(stack: WorkerStack) -> None:
    job_id = stack.submit(FIELDS.read_bytes())
    with stack.client.get_queue_receiver(stack.queue_name) as receiver:
        [message] = receiver.receive_messages(max_message_count=1, max_wait_time=5)
        assert stack.jobs.claim(job_id, worker_id="killed", lease=timedelta(seconds=-1), max_attempts=5)
        receiver.complete_message(message)  # the worker completed it, then died: no message is left anywhere
    report = stack.reconcile()
    assert report.requeued == 1
    job = stack.job(job_id)
    assert (job.status, job.generation, job.attempts) == (JobStatus.QUEUED, 2, 1)
    assert job.sent_at is not None
    assert [m.message_id for m in stack.queued()] == [f"{job_id}:2"]


def test_the_reconciler_redrives_a_message_the_broker_dead_lettered(stack_factory: StackFactory) -> None:
    """Deliveries spent without a claim (drains, a database outage) end in MaxDeliveryCountExceeded: the job is
    handed over again as a new generation, and runs."""
    stack = stack_factory({"MaxDeliveryCount": 1})
    job_id = stack.submit(FIELDS.read_bytes())
    with stack.client.get_queue_receiver(stack.queue_name) as receiver:
        [message] = receiver.receive_messages(max_message_count=1, max_wait_time=5)
        receiver.abandon_message(message)
    [dead] = stack.dead_letters()
    assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
    report = stack.reconcile()
    assert (report.dead_letters, report.redriven) == (1, 1)
    assert stack.dead_letters() == []
    assert [m.message_id for m in stack.queued()] == [f"{job_id}:2"]
    with stack.pool.connection() as conn:
        rows = conn.execute("SELECT message_id, reason, action FROM dead_letters").fetchall()
    assert rows == [(f"{job_id}:1", "MaxDeliveryCountExceeded", "redrive")]
    run(stack.settings(), analyzer=SlowAnalyzer(0), max_jobs=1)
    assert stack.job(job_id).status is JobStatus.SUCCEEDED
    assert stack.reconcile().changed == 0


def test_h6_a_dead_letter_of_an_old_generation_leaves_the_running_copy_alone(stack: WorkerStack) -> None:
    message = stack.create_job(FIELDS.read_bytes())
    stack.send(message)
    newer = stack.jobs.resend(message.job_id, 1, timedelta(seconds=-1))
    assert newer is not None
    running = stack.jobs.claim(message.job_id, worker_id="w", lease=timedelta(minutes=1), max_attempts=5)
    assert running is not None
    with stack.client.get_queue_receiver(stack.queue_name) as receiver:
        [old] = receiver.receive_messages(max_message_count=1, max_wait_time=5)
        receiver.dead_letter_message(old, reason="MaxDeliveryCountExceeded", error_description="by the broker")
    report = stack.reconcile()
    assert (report.dead_letters, report.changed) == (1, 0)
    assert stack.job(message.job_id) == running


def test_an_expired_message_fails_its_queued_job(stack_factory: StackFactory) -> None:
    stack = stack_factory({"DeadLetteringOnMessageExpiration": True})
    message = stack.create_job(FIELDS.read_bytes())
    stack.send(message, ttl=timedelta(seconds=1))
    assert stack.jobs.confirm_sent(message.job_id, 1)
    deadline = time.monotonic() + 20
    while not stack.dead_letters() and time.monotonic() < deadline:
        time.sleep(0.5)
    report = stack.reconcile()
    assert report.dead_lettered_failed == 1
    job = stack.job(message.job_id)
    assert (job.status, job.error_code) == (JobStatus.FAILED, "message_expired")
