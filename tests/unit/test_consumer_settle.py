"""One message through the consumer (claim, attempt, settle) with a recording receiver and the in-memory fakes.

What the broker does with each settlement and what the row says afterwards; the real SDK and the real backends are
the integration tier's (tests/integration). Each delivery runs the consumer's real pipeline (its three threads) for
that one message; several messages in flight at once are tests/unit/test_worker_pipeline.py's.
"""

from __future__ import annotations

import itertools
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from uuid import UUID

import pytest
from azure.servicebus import ServiceBusReceivedMessage, ServiceBusReceiver

from gpu_worker.analysis import AnalysisOutput
from gpu_worker.breaker import Breaker
from gpu_worker.consumer import AttemptLimits, Consumer
from gpu_worker.handler import Checkpoint, JobHandler, Outcome, Prepared, Reporter
from gpu_worker.heartbeat import Heartbeat
from gpu_worker.inbox import PriorityInbox
from gpu_worker.locks import LostLocks
from gpu_worker.registry import Presence
from gpu_worker.settlement import Action, AttemptLost, Cancelled, Interrupted, RetryPolicy
from gpu_worker.shutdown import Shutdown
from shared.errors import BusUnavailable, CropAIError, DatabaseUnavailable, InvalidImage, StorageUnavailable
from shared.jobs import Job, JobStatus
from shared.messages import JobMessage
from tests.fakes import InMemoryJobStore, InMemoryPublisher, InMemoryWorkerRegistry
from tests.jobs import claimed, new_job

MAX = 3
RETRY = RetryPolicy(max_attempts=MAX, backoff=timedelta(seconds=10), backoff_max=timedelta(minutes=5))
_tokens = itertools.count()


class Message:
    """What the consumer reads of a ``ServiceBusReceivedMessage``."""

    def __init__(self, body: bytes, message_id: str) -> None:
        self.body = [body]
        self.message_id = message_id
        self.delivery_count = 0
        self.application_properties: dict[bytes, bytes] = {}
        self.lock_token = f"token-{next(_tokens)}"
        self.locked_until_utc = datetime.now(UTC) + timedelta(minutes=5)


class Receiver:
    """Hands out the messages queued in ``messages``; records each settlement as ``(action, message_id, reason)``,
    and in ``log`` each receive and settlement in order, as ``(what, message_id)``."""

    def __init__(self) -> None:
        self.messages: deque[Message] = deque()
        self.settled: list[tuple[str, str, str | None]] = []
        self.descriptions: list[str | None] = []
        self.log: list[tuple[str, str]] = []

    def receive_messages(self, max_message_count: int, max_wait_time: float) -> list[Message]:
        if not self.messages:
            return []
        message = self.messages.popleft()
        self.log.append(("received", message.message_id))
        return [message]

    def complete_message(self, message: Message) -> None:
        self._settled("complete", message, None)

    def abandon_message(self, message: Message) -> None:
        self._settled("abandon", message, None)

    def dead_letter_message(
        self, message: Message, reason: str | None = None, error_description: str | None = None
    ) -> None:
        self.descriptions.append(error_description)
        self._settled("dead_letter", message, reason)

    def _settled(self, action: str, message: Message, reason: str | None) -> None:
        self.settled.append((action, message.message_id, reason))
        self.log.append((action, message.message_id))


class Handler(JobHandler):
    """Runs an attempt's analysis by raising ``error`` (or succeeding); records the attempts it was given. Its
    ``prepare`` downloads nothing; its ``finish`` stores the result. ``events``: ``(stage, job_id)`` as each stage
    ends (``prepared``, ``analysed``, ``finished``; ``uploading`` once its finish has reported the upload stage, a
    checkpoint), from whichever thread runs it; ``on_prepare`` runs first in its stage, ``on_finish`` after the
    upload report."""

    def __init__(self, jobs: InMemoryJobStore, tmp_path: Path, error: BaseException | None = None) -> None:
        self._jobs_store = jobs
        self._tmp_path = tmp_path
        self.error = error
        self.runs: list[int] = []
        self.before: Callable[[Job, Reporter], object] | None = None  # inside the attempt, before its outcome
        self.on_prepare: Callable[[Job], object] | None = None
        self.on_finish: Callable[[Job], object] | None = None
        self.events: list[tuple[str, UUID]] = []

    def prepare(self, job: Job, checkpoint: Checkpoint, progress: Reporter) -> Prepared:
        if self.on_prepare is not None:
            self.on_prepare(job)
        checkpoint.check()
        progress.report("download")
        self.events.append(("prepared", job.job_id))
        return Prepared(tempfile.TemporaryDirectory(dir=self._tmp_path))

    def analyse(self, job: Job, prepared: Prepared, progress: Reporter) -> AnalysisOutput:
        self.runs.append(job.attempts)
        if self.before is not None:
            self.before(job, progress)
        if self.error is not None:
            raise self.error
        self.events.append(("analysed", job.job_id))
        return AnalysisOutput(result={"attempt": job.attempts})

    def finish(self, job: Job, output: AnalysisOutput, checkpoint: Checkpoint, progress: Reporter) -> Outcome:
        progress.report("upload")  # first, as the real handler's: nothing kept is written after the result
        self.events.append(("uploading", job.job_id))
        if self.on_finish is not None:
            self.on_finish(job)
        assert self._jobs_store.succeed(job.job_id, job.attempts, output.result) is not None
        self.events.append(("finished", job.job_id))
        return Outcome.SUCCEEDED


class Notifier:
    """Records the jobs whose events the consumer handed on, with the job's status at that moment."""

    def __init__(self, jobs: InMemoryJobStore) -> None:
        self.jobs = jobs
        self.flushed: list[tuple[UUID, str]] = []

    def flush(self, job: Job) -> None:
        current = self.jobs.get(job.job_id)
        self.flushed.append((job.job_id, current.status.value if current else "?"))


class World:
    def __init__(
        self,
        tmp_path: Path,
        jobs: InMemoryJobStore,
        *,
        in_flight: int = 1,
        analyses: int = 1,
        shutdown: Shutdown | None = None,
    ) -> None:
        self.jobs = jobs
        self.shutdown = shutdown or Shutdown(grace=300)
        self.publisher = InMemoryPublisher()
        self.receiver = Receiver()  # the normal queue's: each delivery is received from it
        self.delivered: list[Message] = []
        self.handler = Handler(self.jobs, tmp_path)
        self.notifier = Notifier(self.jobs)
        self.registry = InMemoryWorkerRegistry()
        self.presence = Presence(self.registry, "w1", "host", "cpu", interval=60).start()
        self.breaker = Breaker({}, max_interval=1, open_because=None)
        self.locks = locks = LostLocks()
        self.consumer = Consumer(
            PriorityInbox(
                cast(ServiceBusReceiver, self.receiver),
                cast(ServiceBusReceiver, Receiver()),
                burst=4,
                wait=0.1,
                locks=locks,
            ),
            self.jobs,
            self.handler,
            self.publisher,
            self.shutdown,
            Heartbeat(tmp_path / "hb"),
            locks,
            self.breaker,
            worker_id="w1",
            retry=RETRY,
            limits=AttemptLimits(lease=timedelta(minutes=5), timeout=timedelta(minutes=10), hard_exit_after=5),
            notifier=self.notifier,
            presence=self.presence,
            in_flight=in_flight,
            analyses=analyses,
        )

    def process(self, message: Message) -> None:
        """Receive ``message`` and run it through the consumer until it is settled."""
        self.delivered.append(message)
        self.receiver.messages.append(message)
        assert self.consumer.run(max_jobs=1) == 1

    def deliver(self, job: Job) -> Message:
        delivered = self.queue(job)
        assert self.consumer.run(max_jobs=1) == 1
        return delivered

    def queue(self, job: Job) -> Message:
        """The job's message, waiting in the normal queue."""
        message = JobMessage.for_job(job)
        queued = Message(message.to_json(), message.message_id)
        self.delivered.append(queued)
        self.receiver.messages.append(queued)
        return queued

    def job(self, job: Job) -> Job:
        now = self.jobs.get(job.job_id)
        assert now is not None
        return now


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Callable[..., World]]:
    """``make_world(jobs, in_flight=1, analyses=1, shutdown=None)``: a world on that job store (a subclass that fails
    where a test needs it)."""
    worlds: list[World] = []

    def make(jobs: InMemoryJobStore | None = None, **kwargs: Any) -> World:
        worlds.append(World(tmp_path, jobs if jobs is not None else InMemoryJobStore(), **kwargs))
        return worlds[-1]

    yield make
    for world in worlds:
        world.presence.close()


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()


def test_a_succeeded_attempt_completes_the_message(world: World) -> None:
    job = new_job(world.jobs)
    world.deliver(job)
    assert world.receiver.settled == [("complete", f"{job.job_id}:1", None)]
    assert (world.job(job).status, world.job(job).attempts) == (JobStatus.SUCCEEDED, 1)
    assert world.consumer.settled[Action.COMPLETE] == 1


@pytest.mark.parametrize("state", ["running", "succeeded"])
def test_a_job_that_cannot_be_claimed_is_not_run_again(world: World, state: str) -> None:
    job = new_job(world.jobs)
    world.deliver(job)  # succeeded
    if state == "running":
        job = claimed(world.jobs, new_job(world.jobs), worker="w2")  # a live lease elsewhere
    before = world.job(job)
    world.receiver.settled.clear()
    runs = list(world.handler.runs)
    world.deliver(job)
    assert world.receiver.settled == [("complete", f"{job.job_id}:{job.generation}", None)]
    assert world.handler.runs == runs
    assert world.job(job) == before


def test_a_poison_message_is_dead_lettered(world: World) -> None:
    world.process(Message(b"not json", "garbage"))
    assert world.receiver.settled == [("dead_letter", "garbage", "InvalidMessage")]


def test_a_message_for_an_unknown_job_is_dead_lettered(world: World) -> None:
    ghost = new_job(InMemoryJobStore())
    world.deliver(ghost)
    assert world.receiver.settled == [("dead_letter", f"{ghost.job_id}:1", "InvalidMessage")]
    assert world.receiver.descriptions[0] is not None
    assert "does not exist" in world.receiver.descriptions[0]


def test_a_transient_error_releases_the_job_and_schedules_the_next_generation(world: World) -> None:
    job = new_job(world.jobs)
    world.handler.error = StorageUnavailable("throttled")
    before = datetime.now(UTC)
    world.deliver(job)
    assert world.receiver.settled == [("complete", f"{job.job_id}:1", None)]  # backoff costs time, not deliveries
    now = world.job(job)
    assert (now.status, now.generation, now.attempts) == (JobStatus.QUEUED, 2, 1)
    assert now.sent_at is not None
    [(message, at)] = world.publisher.sent
    assert message.message_id == f"{job.job_id}:2"
    assert at is not None
    assert before + timedelta(seconds=10) <= at <= datetime.now(UTC) + timedelta(seconds=10)
    assert world.breaker.open_because == "storage_unavailable"


def test_the_next_generation_claims_the_next_attempt_with_a_doubled_backoff(world: World) -> None:
    job = new_job(world.jobs)
    world.handler.error = DatabaseUnavailable("down")
    world.deliver(job)
    world.deliver(world.job(job))
    assert world.handler.runs == [1, 2]
    [(_, first), (second_message, second)] = world.publisher.sent
    assert second_message.message_id == f"{job.job_id}:3"
    assert first is not None
    assert second is not None
    assert second - first >= timedelta(seconds=9)  # 20 s after the second attempt, 10 s after the first


def test_a_transient_error_on_the_last_attempt_fails_the_job(world: World) -> None:
    job = new_job(world.jobs)
    world.handler.error = BusUnavailable("down")
    for _ in range(MAX):
        world.deliver(world.job(job))
    assert world.handler.runs == [1, 2, 3]
    now = world.job(job)
    assert (now.status, now.error_code) == (JobStatus.FAILED, "retries_exhausted")
    assert world.receiver.settled[-1] == ("dead_letter", f"{job.job_id}:3", "RetriesExhausted")
    assert len(world.publisher.sent) == MAX - 1


def test_a_permanent_error_fails_the_job_and_dead_letters(world: World) -> None:
    job = new_job(world.jobs)
    world.handler.error = InvalidImage("band 4 is empty")
    world.deliver(job)
    now = world.job(job)
    assert (now.status, now.error_code, now.error_message) == (JobStatus.FAILED, "invalid_image", "band 4 is empty")
    assert world.receiver.settled == [("dead_letter", f"{job.job_id}:1", "InvalidImage")]
    assert world.publisher.sent == []


def test_a_lost_attempt_completes_and_leaves_the_job_to_its_owner(world: World) -> None:
    job = new_job(world.jobs)
    world.handler.error = AttemptLost("taken over")
    world.deliver(job)
    assert world.receiver.settled == [("complete", f"{job.job_id}:1", None)]
    now = world.job(job)
    assert (now.status, now.attempts) == (JobStatus.RUNNING, 1)


def test_a_shutdown_retries_at_once(world: World) -> None:
    job = new_job(world.jobs)
    world.handler.error = Interrupted("grace over")
    world.deliver(job)
    [(message, at)] = world.publisher.sent
    assert (message.message_id, at) == (f"{job.job_id}:2", None)
    assert world.job(job).status is JobStatus.QUEUED
    assert world.receiver.settled == [("complete", f"{job.job_id}:1", None)]


def test_keyboard_interrupt_is_settled_then_raised(world: World) -> None:
    job = new_job(world.jobs)
    world.handler.error = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        world.deliver(job)
    assert world.receiver.settled == [("complete", f"{job.job_id}:1", None)]
    assert world.job(job).status is JobStatus.QUEUED


class FailingFail(InMemoryJobStore):
    def fail(self, job_id: Any, attempt: int, code: str, message: str) -> Job | None:
        raise DatabaseUnavailable("connection reset")


def test_a_database_outage_while_failing_the_job_abandons_the_message(make_world: Callable[..., World]) -> None:
    world = make_world(FailingFail())
    world.handler.error = InvalidImage("bad")
    job = new_job(world.jobs)
    world.deliver(job)
    assert world.receiver.settled == [("abandon", f"{job.job_id}:1", None)]
    assert world.job(job).status is JobStatus.RUNNING  # the redelivery, or the reconciler, comes back to it


def test_a_send_failure_while_rescheduling_abandons_and_leaves_the_job_released(world: World) -> None:
    job = new_job(world.jobs)
    world.handler.error = StorageUnavailable("throttled")
    world.publisher.failure = BusUnavailable("down")
    world.deliver(job)
    assert world.receiver.settled == [("abandon", f"{job.job_id}:1", None)]
    now = world.job(job)
    assert (now.status, now.generation, now.sent_at) == (JobStatus.QUEUED, 2, None)  # the redelivery claims it


def test_a_lost_lock_settles_nothing_but_the_job_still_fails(world: World) -> None:
    job = new_job(world.jobs)
    world.handler.error = InvalidImage("bad")

    def renewal_failed(job: Job, progress: Reporter) -> None:  # the renewer reports it while the attempt runs
        [message] = [m for m in world.delivered if m.message_id == f"{job.job_id}:1"]
        world.locks.on_renew_failure(cast(ServiceBusReceivedMessage, message), ConnectionError("link detached"))

    world.handler.before = renewal_failed
    world.deliver(job)
    assert world.receiver.settled == []
    assert world.job(job).error_code == "invalid_image"


class Flaky:
    """A probe that fails while ``down``; the store's ``failure`` follows it when ``store`` is given."""

    def __init__(self, error: CropAIError, store: InMemoryJobStore | None = None) -> None:
        self.error = error
        self.store = store
        self.down = True
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls >= 3:  # the backend comes back after two probes
            self.down = False
            if self.store is not None:
                self.store.failure = None
        if self.down:
            raise self.error


def test_an_outage_the_probes_confirm_releases_the_attempt_uncharged(world: World) -> None:
    probe = Flaky(StorageUnavailable("connection refused"))
    world.breaker._probes = {"storage": probe}
    job = new_job(world.jobs)
    world.handler.error = StorageUnavailable("connection refused")
    world.deliver(job)
    now = world.job(job)
    assert (now.status, now.attempts, now.drains, now.charged) == (JobStatus.QUEUED, 1, 1, 0)
    assert world.breaker.open_because == "storage_unavailable"
    assert world.receiver.settled == [("complete", f"{job.job_id}:1", None)]
    assert [m.generation for m, _ in world.publisher.sent] == [2]


def test_a_storage_error_the_probes_do_not_confirm_is_charged(world: World) -> None:
    world.breaker._probes = {"storage": lambda: None}  # the container answers: this job's blob is the problem
    job = new_job(world.jobs)
    world.handler.error = StorageUnavailable("one blob unreadable")
    world.deliver(job)
    now = world.job(job)
    assert (now.status, now.drains, now.charged) == (JobStatus.QUEUED, 0, 1)


def test_a_database_outage_at_the_claim_waits_for_the_database_instead_of_abandoning(world: World) -> None:
    world.breaker._probes = {"postgres": Flaky(DatabaseUnavailable("down"), world.jobs)}
    world.breaker._first_interval = 0.01
    job = new_job(world.jobs)
    world.jobs.failure = DatabaseUnavailable("connection refused")
    world.deliver(job)
    assert world.receiver.settled == [("complete", f"{job.job_id}:1", None)]  # no delivery spent
    assert (world.job(job).status, world.job(job).attempts) == (JobStatus.SUCCEEDED, 1)


class FailWriteDownOnce(InMemoryJobStore):
    """The database is down at the first ``fail`` (the attempt's permanent failure), back for the second."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_calls = 0

    def fail(self, job_id: Any, attempt: int, code: str, message: str) -> Job | None:
        self.fail_calls += 1
        if self.fail_calls == 1:
            raise DatabaseUnavailable("connection refused")
        return super().fail(job_id, attempt, code, message)


def test_a_database_outage_at_the_failure_write_waits_for_the_database_then_dead_letters(
    make_world: Callable[..., World],
) -> None:
    jobs = FailWriteDownOnce()
    world = make_world(jobs)
    world.breaker._probes = {"postgres": lambda: None}  # back by the first probe
    job = new_job(jobs)
    world.handler.error = InvalidImage("not a GeoTIFF")
    world.deliver(job)
    assert jobs.fail_calls == 2
    assert (world.job(job).status, world.job(job).error_code) == (JobStatus.FAILED, "invalid_image")
    assert world.receiver.settled == [("dead_letter", f"{job.job_id}:1", "InvalidImage")]  # no delivery spent


def test_the_claim_and_the_settlement_hand_the_job_events_on(world: World) -> None:
    job = new_job(world.jobs)
    world.deliver(job)
    # the claim (job.started), the upload's first report (job.progress: a job shorter than the progress interval
    # writes nothing before it, gpu_worker.progress), the succeed (job.succeeded)
    assert world.notifier.flushed == [(job.job_id, "running")] * 2 + [(job.job_id, "succeeded")]


def test_the_workers_row_names_the_job_in_hand_until_it_is_settled(world: World) -> None:
    """(One job in flight: from its claim to its settlement. Several: tests/unit/test_worker_pipeline.py.)"""
    registry = world.registry

    def beaten(predicate: Callable[[list[UUID | None]], bool]) -> None:
        with registry.beaten:
            assert registry.beaten.wait_for(lambda: predicate(registry.beats), 2.0)  # a bound on a hang

    job = new_job(world.jobs)
    world.handler.before = lambda job, _: beaten(lambda beats: job.job_id in beats)  # while the attempt runs
    world.deliver(job)
    beaten(lambda beats: beats[-1] is None)  # idle again once settled
    assert registry.rows["w1"] == ("host", "cpu", None)


def _cancel(world: World, *, seen: bool) -> Callable[[Job, Reporter], object]:
    """A cancellation requested through the API while the attempt runs; ``seen``: a progress report saw it."""

    def cancel(job: Job, progress: Reporter) -> None:
        assert world.jobs.request_cancel(job.job_id) is not None
        if seen:
            cast(Any, progress)._interval = 0  # the next report is written, and returns the cancelled row
            progress.report("decode")

    return cancel


def test_a_cancelled_attempt_is_stopped_and_its_message_completed(world: World) -> None:
    job = new_job(world.jobs)
    world.handler.before = _cancel(world, seen=True)
    world.handler.error = AssertionError("not reached: the report raised Cancelled")
    world.deliver(job)
    now = world.job(job)
    assert (now.status, now.attempts, now.result, now.error_code) == (JobStatus.CANCELLED, 1, None, None)
    assert now.finished_at is not None
    assert world.receiver.settled == [("complete", f"{job.job_id}:1", None)]
    assert world.publisher.sent == []
    assert world.notifier.flushed[-1] == (job.job_id, "cancelled")
    assert world.consumer.settled[Action.COMPLETE] == 1


@pytest.mark.parametrize(
    "error",
    [StorageUnavailable("throttled"), InvalidImage("band 4 is empty"), Interrupted("grace over")],
    ids=["transient", "permanent", "shutdown"],
)
@pytest.mark.parametrize("seen", [True, False], ids=["cancel-seen", "cancel-unseen"])
def test_an_attempt_that_fails_while_its_job_is_being_cancelled_is_stopped(
    world: World, error: BaseException, seen: bool
) -> None:
    """Seen: the decision stops it. Unseen, a retry's release is refused for a job being cancelled, and the job re-read
    says so; a permanent error unseen still fails the job (``fail`` is not refused)."""
    job = new_job(world.jobs)
    if seen:
        world.handler.before = _cancel_then_raise(world, error)
    else:
        world.handler.before = _cancel(world, seen=False)
        world.handler.error = error
    world.deliver(job)
    now = world.job(job)
    expected = JobStatus.FAILED if isinstance(error, InvalidImage) and not seen else JobStatus.CANCELLED
    assert now.status is expected
    assert world.publisher.sent == []  # never retried
    assert [action for action, _, _ in world.receiver.settled] == (
        ["dead_letter"] if expected is JobStatus.FAILED else ["complete"]
    )


def _cancel_then_raise(world: World, error: BaseException) -> Callable[[Job, Reporter], object]:
    """The guard sees the cancellation (a renewal or a report did), then the attempt fails before a checkpoint."""

    def run(job: Job, progress: Reporter) -> None:
        assert world.jobs.request_cancel(job.job_id) is not None
        guard = cast(Any, progress)._guard
        guard.observe(world.jobs.get(job.job_id))
        raise error

    return run


class StopDownOnce(InMemoryJobStore):
    def __init__(self) -> None:
        super().__init__()
        self.stop_calls = 0

    def stop(self, job_id: UUID, attempt: int) -> Job | None:
        self.stop_calls += 1
        if self.stop_calls == 1:
            raise DatabaseUnavailable("connection refused")
        return super().stop(job_id, attempt)


def test_a_database_outage_at_the_stop_waits_for_the_database_then_completes(make_world: Callable[..., World]) -> None:
    jobs = StopDownOnce()
    world = make_world(jobs)
    world.breaker._probes = {"postgres": lambda: None}
    job = new_job(jobs)
    world.handler.before = _cancel(world, seen=True)
    world.deliver(job)
    assert jobs.stop_calls == 2
    assert world.job(job).status is JobStatus.CANCELLED
    assert world.receiver.settled == [("complete", f"{job.job_id}:1", None)]


def test_a_cancelled_attempt_whose_job_the_reconciler_ended_completes(world: World) -> None:
    job = new_job(world.jobs)

    def stalled_past_its_lease(job: Job, progress: Reporter) -> None:
        assert world.jobs.request_cancel(job.job_id) is not None
        expired = world.job(job).model_copy(update={"lease_until": datetime.now(UTC) - timedelta(seconds=1)})
        world.jobs._jobs[job.job_id] = expired
        assert world.jobs.cancel_expired(job.job_id) is not None  # the reconciler
        raise Cancelled("seen at a checkpoint")

    world.handler.before = stalled_past_its_lease
    world.deliver(job)
    assert world.job(job).status is JobStatus.CANCELLED  # by the reconciler; the stop was refused
    assert world.receiver.settled == [("complete", f"{job.job_id}:1", None)]
