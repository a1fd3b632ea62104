"""Send confirmations written behind the answer (:mod:`shared.confirmations`), on the in-memory job store."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from uuid import UUID

import pytest

from shared.confirmations import ConfirmBehind
from shared.errors import DatabaseUnavailable
from shared.jobs import Job
from tests.fakes import InMemoryJobStore


def new_job(jobs: InMemoryJobStore) -> Job:
    job_id = uuid.uuid4()
    job, _ = jobs.create(
        job_id=job_id, input_blob=f"{job_id}/input.tif", input_sha256="0" * 64, params={}, idempotency_key=None
    )
    return job


class Gated(InMemoryJobStore):
    """Confirms wait for ``gate``; ``failures`` maps a job to what its confirm raises."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.failures: dict[UUID, BaseException] = {}
        self.confirming: list[threading.Thread] = []
        self.stuck = False  # a gate never opened (the confirm's thread would swallow an assertion)

    def confirm_sent(self, job_id: UUID, generation: int) -> Job | None:
        self.confirming.append(threading.current_thread())
        self.stuck |= not self.gate.wait(10)
        if job_id in self.failures:
            raise self.failures[job_id]
        return super().confirm_sent(job_id, generation)

    def wait_confirming(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while len(self.confirming) < count:
            assert time.monotonic() < deadline, "no confirm began"
            time.sleep(0.001)


@pytest.fixture
def jobs() -> Iterator[Gated]:
    store = Gated()
    yield store
    store.gate.set()
    assert not store.stuck


@pytest.fixture
def behind(jobs: Gated) -> Iterator[ConfirmBehind]:
    confirms = ConfirmBehind(jobs)
    yield confirms
    confirms.close(timeout=5)


def sent_at(jobs: InMemoryJobStore, job: Job) -> object:
    now = jobs.get(job.job_id)
    assert now is not None
    return now.sent_at


def test_the_answer_does_not_wait_and_the_send_is_recorded_behind_it(jobs: Gated, behind: ConfirmBehind) -> None:
    job = new_job(jobs)
    jobs.gate.clear()  # the database is slow: the caller must not wait for it
    assert behind.confirm(job) is job
    assert sent_at(jobs, job) is None
    assert not behind.flush(timeout=0.05)
    jobs.gate.set()
    assert behind.flush(timeout=5)
    assert sent_at(jobs, job) is not None
    assert jobs.confirming == [behind._thread]  # written by the background thread, not the caller


def test_a_failed_confirm_is_logged_and_left_to_the_reconciler(
    jobs: Gated, behind: ConfirmBehind, caplog: pytest.LogCaptureFixture
) -> None:
    lost, broken, fine = new_job(jobs), new_job(jobs), new_job(jobs)
    jobs.failures[lost.job_id] = DatabaseUnavailable("down")
    jobs.failures[broken.job_id] = RuntimeError("unexpected")
    with caplog.at_level(logging.WARNING, logger="shared.confirmations"):
        for job in (lost, broken, fine):
            behind.confirm(job)
        assert behind.flush(timeout=5)
    assert (sent_at(jobs, lost), sent_at(jobs, broken)) == (None, None)  # the reconciler resends them
    assert sent_at(jobs, fine) is not None  # the thread outlived both failures
    messages = [r.getMessage() for r in caplog.records]
    assert any("not recorded" in m for m in messages)
    assert any("confirming the send failed" in m for m in messages)


def test_past_max_pending_the_request_confirms_inline(jobs: Gated) -> None:
    confirms = ConfirmBehind(jobs, max_pending=1)
    first, second, third = new_job(jobs), new_job(jobs), new_job(jobs)
    jobs.gate.clear()
    confirms.confirm(first)  # taken by the thread, which waits at the gate
    jobs.wait_confirming(1)
    confirms.confirm(second)  # queued: the queue is full now
    done = threading.Event()

    def confirm_third() -> None:
        confirms.confirm(third)
        done.set()

    threading.Thread(target=confirm_third, daemon=True).start()
    assert not done.wait(0.1)  # the third waits for its own confirm, inline
    jobs.gate.set()
    assert done.wait(5)
    assert sent_at(jobs, third) is not None
    confirms.close(timeout=5)
    assert all(sent_at(jobs, job) is not None for job in (first, second))


def test_close_writes_what_is_queued_and_later_confirms_are_inline(jobs: Gated) -> None:
    confirms = ConfirmBehind(jobs)
    queued = [new_job(jobs) for _ in range(5)]
    jobs.gate.clear()
    for job in queued:
        confirms.confirm(job)
    threading.Timer(0.05, jobs.gate.set).start()
    confirms.close(timeout=5)
    assert all(sent_at(jobs, job) is not None for job in queued)
    assert confirms._thread is not None
    assert not confirms._thread.is_alive()
    late = new_job(jobs)
    assert sent_at(jobs, confirms.confirm(late)) is not None  # inline: returns the confirmed row
    assert jobs.confirming[-1] is threading.current_thread()
    confirms.close(timeout=5)  # atexit closes again: nothing is left waiting
    assert confirms.flush(timeout=0.1)


def test_close_gives_up_after_its_timeout(jobs: Gated, caplog: pytest.LogCaptureFixture) -> None:
    confirms = ConfirmBehind(jobs)
    jobs.gate.clear()
    stuck = new_job(jobs)
    confirms.confirm(stuck)
    with caplog.at_level(logging.WARNING, logger="shared.confirmations"):
        confirms.close(timeout=0.05)
    assert any("left to the reconciler at exit" in r.getMessage() for r in caplog.records)
    jobs.gate.set()


def test_close_is_bounded_by_its_timeout_with_the_queue_full_and_a_second_close_does_nothing(jobs: Gated) -> None:
    confirms = ConfirmBehind(jobs, max_pending=1)
    jobs.gate.clear()
    confirms.confirm(new_job(jobs))
    jobs.wait_confirming(1)
    confirms.confirm(new_job(jobs))  # the queue is full, the thread stuck on the database
    started = time.monotonic()
    confirms.close(timeout=0.2)
    confirms.close(timeout=0.2)
    assert time.monotonic() - started < 5  # not until the database answers (10 s here)
    jobs.gate.set()
    assert confirms.flush(timeout=5)  # no stray sentinel left unfinished by the second close


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death this test causes
def test_a_thread_that_died_is_replaced(jobs: Gated, behind: ConfirmBehind) -> None:
    fatal, later = new_job(jobs), new_job(jobs)
    jobs.failures[fatal.job_id] = SystemExit()  # not an Exception: it ends the thread
    behind.confirm(fatal)
    assert behind.flush(timeout=5)
    first = behind._thread
    assert first is not None
    first.join(5)
    assert not first.is_alive()
    behind.confirm(later)
    assert behind.flush(timeout=5)
    assert sent_at(jobs, later) is not None
    assert behind._thread is not first
