"""The worker against real backends: the Service Bus emulator through the real SDK, PostgreSQL, Azurite, real GeoTIFFs.

The worker runs in-process (``gpu_worker.__main__.run``, the same wiring as ``python -m gpu_worker``) with
``max_jobs`` so that each test knows when it is done; the SIGTERM tests run it as a subprocess.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from azure.servicebus import ServiceBusMessage
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gpu_worker.__main__ import healthcheck
from gpu_worker.analysis import AnalysisOutput, AnalysisRequest
from gpu_worker.app import run
from shared.errors import StorageUnavailable
from shared.jobs import JobStatus
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
        if r.name == "gpu_worker.settle" and hasattr(r, "reason")
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
    assert job.result["attempt"] == 1
    uploaded = stack.results(job_id)
    assert {f"{job_id}/1/{url.rsplit('/', 1)[1]}" for url in outputs.values()} == uploaded
    assert all(f"/results/{job_id}/1/" in url for url in outputs.values())
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
    stack.send(ServiceBusMessage(b'{"schema_version": 2, "job_id": "nope"}', message_id=job.message_id))
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
    assert dead.message_id == f"{job_id}:1"
    assert dead.dead_letter_reason == reason
    assert dead.dead_letter_error_description
    assert dead.delivery_count == 0  # never retried
    assert stack.queued() == []
    assert ("dead_letter", reason) in _actions(caplog)
    if reason == "InvalidMessage":  # undecodable: no claim, so the reconciler fails the job from the dead letter
        assert stack.job(job_id).status is JobStatus.QUEUED
        report = stack.reconcile()
        assert (report.dead_letters, report.dead_lettered_failed) == (1, 1)
        assert stack.dead_letters() == []  # drained: the record is in the dead_letters table
    job = stack.job(job_id)
    assert (job.status, job.error_code) == (JobStatus.FAILED, code)
    assert dead.dead_letter_error_description in (job.error_message or "")


@pytest.mark.parametrize(
    ("error", "unexpected"),
    [(StorageUnavailable("blob storage throttled"), False), (ZeroDivisionError("a bug"), True)],
    ids=["transient", "unexpected"],
)
def test_a_failing_attempt_is_retried_with_backoff_without_spending_deliveries(
    stack: WorkerStack, caplog: pytest.LogCaptureFixture, error: Exception, unexpected: bool
) -> None:
    """Each retry completes its message and schedules the next generation after an exponential backoff (1 s, 2 s):
    no delivery is spent, and JOB_MAX_ATTEMPTS bounds the retries."""
    job_id = stack.submit(FIELDS.read_bytes())
    with caplog.at_level(logging.INFO):
        run(stack.settings(JOB_MAX_ATTEMPTS="3"), analyzer=FailingAnalyzer(error), max_jobs=3)
    assert _actions(caplog) == [
        ("complete", type(error).__name__), ("complete", type(error).__name__), ("dead_letter", "RetriesExhausted"),
    ]  # fmt: skip
    scheduled = [r for r in caplog.records if getattr(r, "action", None) == "retry_scheduled"]
    assert [r.generation for r in scheduled] == [2, 3]  # type: ignore[attr-defined]
    claims = [r.created for r in caplog.records if getattr(r, "action", None) == "claim"]
    assert len(claims) == 3
    assert claims[1] - claims[0] >= 0.9  # RETRY_BACKOFF=PT1S
    assert claims[2] - claims[1] >= 1.9  # doubled
    with_stack = [r for r in caplog.records if r.name == "gpu_worker.settle" and r.exc_info]
    assert bool(with_stack) is unexpected  # a bug is logged with its stack trace
    [dead] = stack.dead_letters()
    assert (dead.message_id, dead.dead_letter_reason, dead.delivery_count) == (f"{job_id}:3", "RetriesExhausted", 0)
    job = stack.job(job_id)
    assert (job.status, job.error_code, job.attempts, job.generation) == (
        JobStatus.FAILED, "retries_exhausted", 3, 3,
    )  # fmt: skip
    assert job.error_message is not None
    assert str(error) in job.error_message


def test_a_redelivered_message_for_a_succeeded_job_is_completed_without_running_again(
    stack: WorkerStack, caplog: pytest.LogCaptureFixture
) -> None:
    message = stack.create_job(FIELDS.read_bytes())
    attempt = stack.jobs.claim(message.job_id, worker_id="crashed", lease=timedelta(minutes=1), max_attempts=5)
    assert attempt is not None
    assert stack.jobs.succeed(message.job_id, 1, {"written": "by the first delivery"})  # then the worker crashed
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
    assert any(getattr(r, "action", None) == "not_claimed" for r in caplog.records)


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
    assert (dead.message_id, dead.dead_letter_reason) == (message.message_id, "InvalidMessage")
    assert stack.jobs.get(message.job_id) is None


def test_a_schema_1_message_in_flight_across_the_upgrade_still_runs_its_job(stack: WorkerStack) -> None:
    message = stack.create_job(FIELDS.read_bytes())
    body = message.model_dump(mode="json", exclude={"generation"}) | {"schema_version": 1}
    stack.send(ServiceBusMessage(json.dumps(body), message_id=str(message.job_id), content_type="application/json"))
    run(stack.settings(), analyzer=SlowAnalyzer(0), max_jobs=1)
    job = stack.job(message.job_id)
    assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 1)
