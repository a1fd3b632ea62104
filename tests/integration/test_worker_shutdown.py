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

from local.ports import free_port
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


def _running(stack: WorkerStack, job_id: UUID, worker: Worker) -> None:
    job = stack.wait_for(job_id, "running", "succeeded", "failed")
    assert job.status is JobStatus.RUNNING, worker.output()


def test_sigterm_lets_the_job_in_hand_finish_and_exits_0(
    stack: WorkerStack, start_worker: Callable[..., Worker]
) -> None:
    job_id = stack.submit(FIELDS.read_bytes())
    worker = start_worker(seconds=4, grace=60)
    _running(stack, job_id, worker)
    assert worker.healthcheck() == 0  # busy, and the heartbeat says so
    worker.signal()
    assert worker.wait() == 0, worker.output()
    job = stack.job(job_id)
    assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 1), worker.output()
    assert stack.queued() == []
    assert "shutdown requested (SIGTERM)" in worker.output()
    assert worker.healthcheck("--max-age", "0") == 1  # stopped: the heartbeat goes stale


@pytest.mark.parametrize("how", ["grace period over", "second signal"])
def test_a_job_that_cannot_finish_in_time_is_released_and_handed_over_without_spending_a_delivery(
    stack: WorkerStack, start_worker: Callable[..., Worker], how: str
) -> None:
    job_id = stack.submit(FIELDS.read_bytes())
    worker = start_worker(seconds=300, grace=1 if how == "grace period over" else 300)
    _running(stack, job_id, worker)
    worker.signal()
    if how == "second signal":
        worker.wait_for_output("draining")
        worker.signal(signal.SIGINT)
    assert worker.wait() == 0, worker.output()
    assert "shutdown forced" in worker.output()
    [message] = stack.queued()
    # Released, the next generation sent at once for another worker, the interrupted delivery completed.
    assert (message.message_id, message.delivery_count) == (f"{job_id}:2", 0)
    job = stack.job(job_id)
    assert (job.status, job.attempts, job.generation, job.drains) == (JobStatus.QUEUED, 1, 2, 1)  # not charged
    assert job.sent_at is not None


def test_max_jobs_exits_0_by_itself(stack: WorkerStack, start_worker: Callable[..., Worker]) -> None:
    jobs = [stack.submit(FIELDS.read_bytes()) for _ in range(3)]
    worker = start_worker(seconds=0, grace=60, args=("--max-jobs", "2"))
    assert worker.wait() == 0, worker.output()
    done = sorted(stack.job(job_id).status.value for job_id in jobs)
    assert done == ["queued", "succeeded", "succeeded"], worker.output()


def test_a_job_past_its_time_limit_is_stopped_and_failed_timed_out(
    stack: WorkerStack, start_worker: Callable[..., Worker]
) -> None:
    job_id = stack.submit(FIELDS.read_bytes())
    worker = start_worker(seconds=300, grace=30, args=("--max-jobs", "1"), JOB_TIMEOUT="PT3S", JOB_LEASE="PT1S")
    assert worker.wait() == 0, worker.output()
    job = stack.job(job_id)
    assert (job.status, job.error_code, job.attempts) == (JobStatus.FAILED, "timed_out", 1), worker.output()
    [dead] = stack.dead_letters()
    assert (dead.message_id, dead.dead_letter_reason) == (f"{job_id}:1", "TimedOut")
    assert stack.queued() == []


def test_a_job_that_ignores_its_interruption_makes_the_worker_exit_for_a_restart(
    stack: WorkerStack, start_worker: Callable[..., Worker]
) -> None:
    """A call that never returns to Python cannot be interrupted: past the time limit and the grace, the process
    exits 75 for its supervisor to restart; the healthcheck says unhealthy while the job overruns."""
    job_id = stack.submit(FIELDS.read_bytes())
    worker = start_worker(
        seconds=300, grace=4, JOB_TIMEOUT="PT3S", JOB_LEASE="PT1S", WORKER_HEARTBEAT_MAX_AGE="1",
        SLOW_ANALYZER_STUBBORN="1",
    )  # fmt: skip
    _running(stack, job_id, worker)
    worker.wait_for_output("ran past the time limit", timeout=30)
    assert worker.healthcheck() == 1, worker.output()  # overrunning: unhealthy
    assert worker.wait() == 75, worker.output()
    job = stack.job(job_id)
    assert (job.status, job.error_code) == (JobStatus.FAILED, "timed_out"), worker.output()


def test_a_worker_started_while_the_database_is_down_receives_nothing_until_it_answers(
    stack: WorkerStack, start_worker: Callable[..., Worker]
) -> None:
    """The breaker starts open: no message is taken (nor a delivery spent) for a job that cannot be claimed."""
    job_id = stack.submit(FIELDS.read_bytes())
    closed = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing?connect_timeout=1"
    worker = start_worker(seconds=0, grace=30, DATABASE_URL=closed, DB_POOL_TIMEOUT="1", DB_POOL_MIN_SIZE="0")
    worker.wait_for_output("probe postgres failed")
    time.sleep(3)
    [message] = stack.queued()
    assert (message.message_id, message.delivery_count) == (f"{job_id}:1", 0), worker.output()
    assert "claim" not in worker.output()
    worker.signal()
    assert worker.wait() == 0, worker.output()  # a shutdown ends the wait

    healthy = start_worker(seconds=0, grace=30, args=("--max-jobs", "1"))
    assert healthy.wait() == 0, healthy.output()
    job = stack.job(job_id)
    assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 1)
