"""SIGTERM drain of the worker process: ``python -m gpu_worker``'s ``main`` with a slow stand-in analyzer, as a
subprocess against the real backends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import UUID

import pytest

from shared.jobs import JobStatus
from tests.integration.worker_helpers import FIELDS, StackFactory, WorkerStack
from tests.integration.worker_helpers import stack_factory as stack_factory

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def stack(stack_factory: StackFactory) -> WorkerStack:
    return stack_factory()


class Worker:
    def __init__(
        self, stack: WorkerStack, log: Path, *, seconds: float, grace: float, args: tuple[str, ...] = (), **env: str
    ) -> None:
        self.log = log
        environment = {
            **os.environ,
            **stack.env,
            "SLOW_ANALYZER_SECONDS": str(seconds),
            "WORKER_SHUTDOWN_GRACE": str(grace),
            **env,
        }
        self.env = environment
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.worker_helpers", *args],
                cwd=ROOT,
                env=environment,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"worker did not exit within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() > deadline or self.process.poll() is not None:
                pytest.fail(f"{text!r} not in the worker's output:\n{self.output()}")
            time.sleep(0.1)

    def healthcheck(self, *args: str) -> int:
        command = [sys.executable, "-m", "gpu_worker", "--healthcheck", *args]
        return subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, check=False).returncode


@pytest.fixture
def start_worker(stack: WorkerStack, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(**kwargs: object) -> Worker:
        worker = Worker(stack, tmp_path / f"worker-{len(workers)}.log", **kwargs)  # type: ignore[arg-type]
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


def _processing(stack: WorkerStack, job_id: UUID, worker: Worker) -> None:
    job = stack.wait_for(job_id, "processing", "succeeded", "failed")
    assert job.status is JobStatus.PROCESSING, worker.output()


def test_sigterm_lets_the_job_in_hand_finish_and_exits_0(
    stack: WorkerStack, start_worker: Callable[..., Worker]
) -> None:
    job_id = stack.submit(FIELDS.read_bytes())
    worker = start_worker(seconds=4, grace=60)
    _processing(stack, job_id, worker)
    assert worker.healthcheck() == 0  # busy, and the heartbeat says so
    worker.signal()
    assert worker.wait() == 0, worker.output()
    job = stack.job(job_id)
    assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 1), worker.output()
    assert stack.queued() == []
    assert "shutdown requested (SIGTERM)" in worker.output()
    assert worker.healthcheck("--max-age", "0") == 1  # stopped: the heartbeat goes stale


@pytest.mark.parametrize("how", ["grace period over", "second signal"])
def test_a_job_that_cannot_finish_in_time_is_abandoned_and_the_worker_exits_0(
    stack: WorkerStack, start_worker: Callable[..., Worker], how: str
) -> None:
    job_id = stack.submit(FIELDS.read_bytes())
    worker = start_worker(seconds=300, grace=1 if how == "grace period over" else 300)
    _processing(stack, job_id, worker)
    worker.signal()
    if how == "second signal":
        worker.wait_for_output("draining")
        worker.signal(signal.SIGINT)
    assert worker.wait() == 0, worker.output()
    assert "shutdown forced" in worker.output()
    [message] = stack.queued()
    assert message.delivery_count == 1  # abandoned: available again at once for another worker
    job = stack.job(job_id)
    assert (job.status, job.attempts) == (JobStatus.PROCESSING, 1)


def test_messages_of_the_batch_not_started_are_abandoned(
    stack: WorkerStack, start_worker: Callable[..., Worker]
) -> None:
    first, second = stack.submit(FIELDS.read_bytes()), stack.submit(FIELDS.read_bytes())
    worker = start_worker(seconds=4, grace=60, WORKER_MAX_MESSAGE_COUNT="2")
    job = stack.wait_for(first, "processing")
    assert job.status is JobStatus.PROCESSING, worker.output()
    worker.signal()
    assert worker.wait() == 0, worker.output()
    assert stack.job(first).status is JobStatus.SUCCEEDED
    assert stack.job(second).status is JobStatus.QUEUED
    [message] = stack.queued()
    assert (message.message_id, message.delivery_count) == (str(second), 1), worker.output()
    assert "not started before shutdown" in worker.output()


@pytest.mark.parametrize("args", [("--max-jobs", "2"), ("--once",)])
def test_max_jobs_and_once_exit_0_by_themselves(
    stack: WorkerStack, start_worker: Callable[..., Worker], args: tuple[str, ...]
) -> None:
    jobs = [stack.submit(FIELDS.read_bytes()) for _ in range(2)]
    worker = start_worker(seconds=0, grace=60, args=args, WORKER_MAX_MESSAGE_COUNT="1")
    assert worker.wait() == 0, worker.output()
    done = [stack.job(job_id).status for job_id in jobs]
    expected = 2 if args[0] == "--max-jobs" else 1  # --once: one batch of WORKER_MAX_MESSAGE_COUNT messages
    assert done == [JobStatus.SUCCEEDED] * expected + [JobStatus.QUEUED] * (2 - expected), worker.output()
