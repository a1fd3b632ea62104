"""The worker against real backends: the Service Bus emulator through the real SDK, PostgreSQL, Azurite, real GeoTIFFs.

The worker runs in-process (``gpu_worker.__main__.run``, the same wiring as ``python -m gpu_worker``) with
``max_jobs`` so that each test knows when it is done; the SIGTERM tests run it as a subprocess.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from azure.servicebus import ServiceBusMessage
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gpu_worker.__main__ import healthcheck
from gpu_worker.analysis import AnalysisOutput, AnalysisRequest
from gpu_worker.app import run
from gpu_worker.consumer import Consumer
from gpu_worker.handler import JobHandler
from gpu_worker.heartbeat import Heartbeat
from gpu_worker.locks import Locks
from gpu_worker.shutdown import Shutdown
from gpu_worker.sweeper import OrphanSweeper
from local.ports import free_port
from shared.bus import JobPublisher
from shared.errors import DatabaseUnavailable, StorageUnavailable
from shared.jobs import JobStatus
from shared.memory import InMemoryJobRepository
from shared.telemetry import configure_telemetry
from tests.integration.worker_helpers import FIELDS, SlowAnalyzer, StackFactory, WorkerStack
from tests.integration.worker_helpers import stack_factory as stack_factory

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(stack_factory: StackFactory) -> WorkerStack:
    return stack_factory()


def _actions(caplog: pytest.LogCaptureFixture) -> list[tuple[str | None, str | None]]:
    """(action, reason) of the worker's settlement log records."""
    return [
        (getattr(r, "action", None), getattr(r, "reason", None))
        for r in caplog.records
        if r.name == "gpu_worker.consumer" and hasattr(r, "reason")
    ]


class FailingAnalyzer:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def analyse(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
        raise self.error


def test_a_real_geotiff_goes_through_the_worker_and_its_span_is_a_child_of_the_submit_span(
    stack: WorkerStack, caplog: pytest.LogCaptureFixture
) -> None:
    settings = stack.settings()
    configure_telemetry(settings, role="test")
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with trace.get_tracer(__name__).start_as_current_span("submit") as submit_span:
        job_id = stack.submit(FIELDS.read_bytes())

    with caplog.at_level(logging.INFO):
        assert run(settings, max_jobs=1) == 0  # the real torch Analyzer, on the CPU

    job = stack.job(job_id)
    assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 1)
    assert job.result is not None
    assert job.result["analysis"] == "crop-health"
    assert -1.0 <= job.result["indices"]["ndvi"]["mean"] <= 1.0
    outputs = job.result["outputs"]
    assert isinstance(outputs, dict)
    uploaded = {b.name for b in stack.results_container().list_blobs(name_starts_with=f"{job_id}/")}
    assert {f"{job_id}/{url.rsplit('/', 1)[1]}" for url in outputs.values()} == uploaded
    assert all(f"/results/{job_id}/" in url for url in outputs.values())
    assert stack.queued() == []
    assert stack.dead_letters() == []
    assert ("complete", None) in _actions(caplog)
    [span] = [s for s in exporter.get_finished_spans() if s.name == "process job"]
    assert span.parent is not None
    assert span.parent.span_id == submit_span.get_span_context().span_id
    assert span.context is not None
    assert span.context.trace_id == submit_span.get_span_context().trace_id
    assert healthcheck(settings, None) == 0  # the loop left a fresh heartbeat


def _poison(stack: WorkerStack) -> Any:
    job = stack.create_job(FIELDS.read_bytes())
    stack.send(ServiceBusMessage(b'{"schema_version": 1, "job_id": "nope"}', message_id=str(job.job_id)))
    return job.job_id


def _missing_blob(stack: WorkerStack) -> Any:
    return stack.submit(None)


def _truncated(stack: WorkerStack) -> Any:
    return stack.submit(FIELDS.read_bytes()[:3000])


def _text(stack: WorkerStack) -> Any:
    return stack.submit(b"this is not a GeoTIFF")


def _unknown_bands(stack: WorkerStack) -> Any:
    return stack.submit(FIELDS.read_bytes(), bands=["X1", "X2", "X3", "X4"])


@pytest.mark.parametrize(
    ("prepare", "reason", "code"),
    [
        (_poison, "InvalidMessage", "invalid_message"),
        (_missing_blob, "InputMissing", "input_missing"),
        (_truncated, "InvalidImage", "invalid_image"),
        (_text, "InvalidImage", "invalid_image"),
        (_unknown_bands, "InvalidImage", "invalid_image"),
    ],
    ids=["poison message", "missing blob", "truncated GeoTIFF", "text body", "unknown band names"],
)
def test_permanent_failures_are_dead_lettered_at_once_and_fail_the_job(
    stack: WorkerStack,
    caplog: pytest.LogCaptureFixture,
    prepare: Callable[[WorkerStack], Any],
    reason: str,
    code: str,
) -> None:
    job_id = prepare(stack)
    with caplog.at_level(logging.INFO):
        run(stack.settings(), max_jobs=1)
    [dead] = stack.dead_letters()
    assert dead.message_id == str(job_id)
    assert dead.dead_letter_reason == reason
    assert dead.dead_letter_error_description
    assert dead.delivery_count == 0  # never retried
    job = stack.job(job_id)
    assert (job.status, job.error_code) == (JobStatus.FAILED, code)
    assert job.error_message == dead.dead_letter_error_description
    assert stack.queued() == []
    assert ("dead_letter", reason) in _actions(caplog)


def test_a_database_outage_abandons_the_message_and_a_later_delivery_succeeds(
    stack: WorkerStack, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = stack.submit(FIELDS.read_bytes())
    closed = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing?connect_timeout=1"
    with caplog.at_level(logging.INFO):
        run(stack.settings(DATABASE_URL=closed, DB_POOL_TIMEOUT="1"), analyzer=SlowAnalyzer(0), max_jobs=1)
    assert ("abandon", "DatabaseUnavailable") in _actions(caplog)
    [message] = stack.queued()
    assert message.delivery_count == 1
    assert stack.job(job_id).status is JobStatus.QUEUED

    run(stack.settings(), analyzer=SlowAnalyzer(0), max_jobs=1)
    job = stack.job(job_id)
    assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 1)
    assert stack.queued() == []
    assert stack.dead_letters() == []


@pytest.mark.parametrize(
    ("error", "unexpected"),
    [(StorageUnavailable("blob storage throttled"), False), (ZeroDivisionError("a bug"), True)],
    ids=["transient", "unexpected"],
)
def test_retries_are_bounded_and_the_last_delivery_fails_the_job(
    stack_factory: StackFactory, caplog: pytest.LogCaptureFixture, error: Exception, unexpected: bool
) -> None:
    stack = stack_factory({"MaxDeliveryCount": 2})
    job_id = stack.submit(FIELDS.read_bytes())
    with caplog.at_level(logging.INFO):
        run(stack.settings(), analyzer=FailingAnalyzer(error), max_jobs=1)
        assert stack.job(job_id).status is JobStatus.PROCESSING
        assert [m.delivery_count for m in stack.queued()] == [1]
        run(stack.settings(), analyzer=FailingAnalyzer(error), max_jobs=1)
    assert _actions(caplog) == [("abandon", type(error).__name__), ("dead_letter", "RetriesExhausted")]
    with_stack = [r for r in caplog.records if r.name == "gpu_worker.consumer" and r.exc_info]
    assert bool(with_stack) is unexpected  # a bug is logged with its stack trace
    [dead] = stack.dead_letters()
    assert dead.dead_letter_reason == "RetriesExhausted"
    job = stack.job(job_id)
    assert (job.status, job.error_code, job.attempts) == (JobStatus.FAILED, "retries_exhausted", 2)
    assert job.error_message is not None
    assert str(error) in job.error_message


def test_a_redelivered_message_for_a_succeeded_job_is_completed_without_writing_again(
    stack: WorkerStack, caplog: pytest.LogCaptureFixture
) -> None:
    message = stack.create_job(FIELDS.read_bytes())
    stack.repo.start_attempt(message.job_id)
    assert stack.repo.succeed(message.job_id, {"written": "by the first delivery"})  # then the worker crashed
    stack.send(message)
    analyzer = SlowAnalyzer(0)
    with caplog.at_level(logging.INFO):
        run(stack.settings(), analyzer=analyzer, max_jobs=1)
    assert analyzer.calls == 0
    job = stack.job(message.job_id)
    assert (job.status, job.attempts, job.result) == (JobStatus.SUCCEEDED, 1, {"written": "by the first delivery"})
    assert stack.queued() == []
    assert stack.dead_letters() == []
    assert ("complete", None) in _actions(caplog)
    assert any(getattr(r, "action", None) == "already_succeeded" for r in caplog.records)


def test_lock_renewal_keeps_a_slow_job_locked_beyond_the_lock_duration(
    stack_factory: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stack = stack_factory({"LockDuration": "PT3S", "MaxDeliveryCount": 2})
    job_id = stack.submit(FIELDS.read_bytes())
    analyzer = SlowAnalyzer(8)  # well past two lock durations: without renewal the broker would redeliver
    with caplog.at_level(logging.INFO):
        run(stack.settings(), analyzer=analyzer, max_jobs=1)
    job = stack.job(job_id)
    assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 1)
    assert analyzer.calls == 1
    assert stack.queued() == []
    assert stack.dead_letters() == []
    assert ("complete", None) in _actions(caplog)
    assert not any(getattr(r, "action", None) == "lock_lost" for r in caplog.records)


def test_an_unknown_job_is_dead_lettered(stack: WorkerStack) -> None:
    message = stack.create_job(FIELDS.read_bytes()).model_copy(update={"job_id": uuid4()})
    stack.send(message)
    run(stack.settings(), analyzer=SlowAnalyzer(0), max_jobs=1)
    [dead] = stack.dead_letters()
    assert (dead.message_id, dead.dead_letter_reason) == (str(message.job_id), "InvalidMessage")
    assert stack.repo.get(message.job_id) is None


class DatabaseDownAtFailure(InMemoryJobRepository):
    """The job repository whose database goes away between the start of the attempt and marking the job failed."""

    def fail(self, job_id: UUID, code: str, message: str) -> bool:
        raise DatabaseUnavailable("connection refused")


@pytest.mark.parametrize(("delivery_count", "action"), [(0, "abandon"), (1, "dead_letter")])
def test_a_permanent_failure_is_not_dead_lettered_while_the_job_cannot_be_marked_failed(
    stack_factory: StackFactory, caplog: pytest.LogCaptureFixture, tmp_path: Path, delivery_count: int, action: str
) -> None:
    stack = stack_factory({"MaxDeliveryCount": 2})
    message = stack.create_job(None)  # the input blob is missing: InputMissing
    repo = DatabaseDownAtFailure()
    repo.create(
        job_id=message.job_id,
        input_blob=message.input_blob,
        input_sha256=message.input_sha256,
        params={},
        idempotency_key=None,
    )
    stack.send(message)
    with stack.client.get_queue_receiver(stack.queue_name) as receiver:
        for _ in range(delivery_count):  # earlier deliveries that failed
            [received] = receiver.receive_messages(max_message_count=1, max_wait_time=10)
            receiver.abandon_message(received)
        consumer = Consumer(
            receiver,
            JobHandler(repo, stack.store, SlowAnalyzer(0)),
            repo,
            Shutdown(grace=1),
            Heartbeat(tmp_path / "hb"),
            Locks(None, max_lock_renewal=60),
            max_delivery_count=2,
            max_message_count=1,
            max_wait_time=10,
        )
        with caplog.at_level(logging.INFO):
            assert consumer.run(max_jobs=1) == 1
    assert any(getattr(r, "action", None) == "fail_job_failed" for r in caplog.records)
    assert _actions(caplog)[-1] == (action, "DatabaseUnavailable" if action == "abandon" else "InputMissing")
    if action == "abandon":  # the next delivery tries again to fail the job, then dead-letters
        assert [m.delivery_count for m in stack.queued()] == [1]
        assert stack.dead_letters() == []
    else:  # the last delivery: dead-lettered anyway; the dead-letter watcher fails the job once the database is back
        assert stack.queued() == []
        [dead] = stack.dead_letters()
        assert dead.dead_letter_reason == "InputMissing"


def test_a_message_waiting_in_the_batch_keeps_its_lock_while_the_one_before_it_runs(
    stack_factory: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Each job may hold its lock for 5 s; the first takes 4.5 s, so the second ends 9 s after the batch was received.
    # Counted from receipt, a flat 5 s renewal would let the second's lock lapse while it runs.
    stack = stack_factory({"LockDuration": "PT3S", "MaxDeliveryCount": 2})
    first, second = (stack.submit(FIELDS.read_bytes()) for _ in range(2))
    analyzer = SlowAnalyzer(4.5)
    settings = stack.settings(WORKER_MAX_MESSAGE_COUNT="2", WORKER_MAX_LOCK_RENEWAL="PT5S")
    with caplog.at_level(logging.INFO):
        run(settings, analyzer=analyzer, max_jobs=2, once=True)
    assert analyzer.calls == 2
    assert [stack.job(j).status for j in (first, second)] == [JobStatus.SUCCEEDED] * 2
    assert _actions(caplog) == [("complete", None), ("complete", None)]
    assert stack.queued() == []


def test_a_message_whose_lock_lapsed_while_it_waited_in_the_batch_is_skipped(
    stack_factory: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # The first job runs far past its renewal budget (and the one of the message waiting behind it): the second's
    # lock is gone before it starts, so another worker may hold it already. It must be neither processed nor settled.
    stack = stack_factory({"LockDuration": "PT2S", "MaxDeliveryCount": 5})
    first, second = (stack.submit(FIELDS.read_bytes()) for _ in range(2))
    analyzer = SlowAnalyzer(7)
    settings = stack.settings(WORKER_MAX_MESSAGE_COUNT="2", WORKER_MAX_LOCK_RENEWAL="PT1S")
    with caplog.at_level(logging.INFO):
        run(settings, analyzer=analyzer, max_jobs=2, once=True)
    assert analyzer.calls == 1
    assert stack.job(first).status is JobStatus.SUCCEEDED  # stored, but its message could not be completed
    job = stack.job(second)
    assert (job.status, job.attempts) == (JobStatus.QUEUED, 0)
    [skipped] = [r for r in caplog.records if getattr(r, "action", None) == "skip_lock_lost"]
    assert getattr(skipped, "message_id", None) == str(second)
    assert [a for a, _ in _actions(caplog)] == ["leave"]  # the first; nothing at all for the second
    assert {m.message_id for m in stack.queued()} == {str(first), str(second)}


def test_the_sweeper_sends_an_orphaned_job_again_and_the_worker_processes_it(stack: WorkerStack) -> None:
    orphan = stack.create_job(FIELDS.read_bytes())  # the submit died after the upload, before the send
    lost = stack.create_job(None)  # ... or before the upload
    publisher = JobPublisher(stack.client, stack.queue_name)
    sweeper = OrphanSweeper(stack.repo, stack.store, publisher, interval=60, older_than=timedelta(0))
    assert sweeper.sweep() == 1
    assert [m.message_id for m in stack.queued()] == [str(orphan.job_id)]
    failed = stack.job(lost.job_id)
    assert (failed.status, failed.error_code) == (JobStatus.FAILED, "enqueue_failed")
    run(stack.settings(), analyzer=SlowAnalyzer(0), max_jobs=1)
    job = stack.job(orphan.job_id)
    assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 1)
    assert job.enqueued_at is not None
    assert sweeper.sweep() == 0
