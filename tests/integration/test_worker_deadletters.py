"""Jobs whose messages the broker dead-lettered by itself are marked failed by the dead-letter watcher."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
from azure.servicebus import ServiceBusMessage, ServiceBusSubQueue
from psycopg_pool import ConnectionPool

from gpu_worker.app import run
from gpu_worker.deadletters import DeadLetterWatcher
from shared.db import PostgresJobRepository
from shared.jobs import JobStatus
from tests.integration.worker_helpers import FIELDS, SlowAnalyzer, StackFactory, WorkerStack
from tests.integration.worker_helpers import stack_factory as stack_factory

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(stack_factory: StackFactory) -> WorkerStack:
    return stack_factory({"MaxDeliveryCount": 2, "LockDuration": "PT3S"})


def _abandoned_until_dead(stack: WorkerStack) -> UUID:
    """A crashing consumer: the message is received and abandoned until the broker gives up on it."""
    job_id = stack.submit(FIELDS.read_bytes())
    with stack.client.get_queue_receiver(stack.queue_name) as receiver:
        for _ in range(stack.max_delivery_count):
            [message] = receiver.receive_messages(max_message_count=1, max_wait_time=10)
            receiver.abandon_message(message)
    return job_id


def _expired(stack: WorkerStack) -> UUID:
    """Nobody consumed the message within its time to live."""
    message = stack.create_job(FIELDS.read_bytes())
    stack.send(message, ttl=timedelta(seconds=1))
    return message.job_id


def _wait_for_dead_letter(stack: WorkerStack, job_id: UUID, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m for m in stack.dead_letters() if m.message_id == str(job_id)]
        if found:
            return found[0]
        time.sleep(0.5)
    pytest.fail(f"message of job {job_id} not dead-lettered within {timeout} s")


@pytest.mark.parametrize(
    ("cause", "reason", "code"),
    [
        (_abandoned_until_dead, "MaxDeliveryCountExceeded", "max_delivery_count_exceeded"),
        (_expired, "TTLExpiredException", "message_expired"),
    ],
    ids=["max delivery count", "time to live"],
)
def test_the_watcher_fails_jobs_the_broker_dead_lettered(
    stack: WorkerStack,
    caplog: pytest.LogCaptureFixture,
    cause: Callable[[WorkerStack], UUID],
    reason: str,
    code: str,
) -> None:
    job_id = cause(stack)
    dead = _wait_for_dead_letter(stack, job_id)
    assert dead.dead_letter_reason == reason
    assert stack.job(job_id).status in (JobStatus.QUEUED, JobStatus.PROCESSING)

    watcher = DeadLetterWatcher(stack.client, stack.queue_name, stack.repo, interval=60)
    with caplog.at_level(logging.INFO):
        assert watcher.poll() == 1
    job = stack.job(job_id)
    assert (job.status, job.error_code) == (JobStatus.FAILED, code)
    assert job.error_message is not None
    assert reason in job.error_message
    assert any(getattr(r, "action", None) == "dlq_job_failed" for r in caplog.records)
    assert [m.message_id for m in stack.dead_letters()] == [str(job_id)]  # peeked, not removed: operators see it
    assert watcher.poll() == 0  # already handled
    restarted = CountingRepository(stack.pool)
    assert DeadLetterWatcher(stack.client, stack.queue_name, restarted, interval=60).poll() == 1  # a restart ...
    assert restarted.failed == []  # ... reads the terminal job, never updates it
    assert stack.job(job_id).updated_at == job.updated_at


class CountingRepository(PostgresJobRepository):
    """The real repository, remembering which jobs it was asked to fail."""

    def __init__(self, pool: ConnectionPool) -> None:
        super().__init__(pool)
        self.failed: list[UUID] = []

    def fail(self, job_id: UUID, code: str, message: str) -> bool:
        self.failed.append(job_id)
        return super().fail(job_id, code, message)


def test_the_watcher_forgets_dead_letters_that_left_the_dead_letter_queue(stack: WorkerStack) -> None:
    for job_id in [_abandoned_until_dead(stack), _abandoned_until_dead(stack)]:
        _wait_for_dead_letter(stack, job_id)
    watcher = DeadLetterWatcher(stack.client, stack.queue_name, stack.repo, interval=60)
    assert watcher.poll() == 2
    assert watcher.remembered == 2
    dlq = stack.client.get_queue_receiver(stack.queue_name, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
    with dlq as receiver:  # an operator drains one of them
        [message] = receiver.receive_messages(max_message_count=1, max_wait_time=10)
        receiver.complete_message(message)
    assert watcher.poll() == 0
    assert watcher.remembered == 1


def test_the_worker_loop_runs_the_watcher_between_batches(stack: WorkerStack) -> None:
    job_id = _abandoned_until_dead(stack)
    _wait_for_dead_letter(stack, job_id)
    later = stack.submit(FIELDS.read_bytes())
    run(stack.settings(WORKER_DEADLETTER_POLL_INTERVAL="5"), analyzer=SlowAnalyzer(0), max_jobs=1)
    assert stack.job(later).status is JobStatus.SUCCEEDED
    job = stack.job(job_id)
    assert (job.status, job.error_code) == (JobStatus.FAILED, "max_delivery_count_exceeded")


def test_dead_letters_that_name_no_job_are_skipped(stack: WorkerStack) -> None:
    stack.send(ServiceBusMessage(b"garbage", message_id="not-a-uuid"))
    with stack.client.get_queue_receiver(stack.queue_name) as receiver:
        [message] = receiver.receive_messages(max_message_count=1, max_wait_time=10)
        receiver.dead_letter_message(message, reason="Test", error_description="garbage")
    job_id = stack.submit(FIELDS.read_bytes())
    with stack.client.get_queue_receiver(stack.queue_name) as receiver:
        [message] = receiver.receive_messages(max_message_count=1, max_wait_time=10)
        receiver.dead_letter_message(message, reason="SomethingElse", error_description="by an operator's tool")
    assert DeadLetterWatcher(stack.client, stack.queue_name, stack.repo, interval=60).poll() == 2
    job = stack.job(job_id)
    assert (job.status, job.error_code) == (JobStatus.FAILED, "dead_lettered")
