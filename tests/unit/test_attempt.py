"""The attempt guard with real threads and short leases: renewal, loss, a database outage, the time limit."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from gpu_worker.attempt import EXIT_TIMED_OUT, AttemptGuard
from gpu_worker.settlement import AttemptLost, Cancelled, Interrupted, TimedOut
from gpu_worker.shutdown import Shutdown
from shared.errors import DatabaseUnavailable
from shared.jobs import Job, JobStatus
from tests.fakes import InMemoryJobStore
from tests.jobs import GONE, claimed, new_job

pytestmark = pytest.mark.timeout(10)

LEASE = timedelta(milliseconds=60)  # the guard ticks every max(lease / 3, 50 ms): every 50 ms here
LONG = timedelta(seconds=30)  # a time limit no test reaches
WAIT = 2.0  # seconds: a bound on a hang, never a speed claim


class Recorder:
    """Stands in for ``Shutdown.interrupt`` and ``os._exit``: records the calls, sets ``called``."""

    def __init__(self) -> None:
        self.calls: list[object] = []
        self.called = threading.Event()

    def __call__(self, value: object) -> None:
        self.calls.append(value)
        self.called.set()


@pytest.fixture
def jobs() -> InMemoryJobStore:
    return InMemoryJobStore()


@pytest.fixture
def running(jobs: InMemoryJobStore) -> Job:
    return claimed(jobs, new_job(jobs), lease=LEASE)


def guard(
    jobs: InMemoryJobStore,
    job: Job,
    *,
    timeout: timedelta = LONG,
    interrupt: Recorder | None = None,
    exit_process: Recorder | None = None,
    hard_exit_after: float = WAIT,
) -> AttemptGuard:
    return AttemptGuard(
        jobs,
        job,
        lease=LEASE,
        timeout=timeout,
        interrupt=interrupt or Recorder(),
        hard_exit_after=hard_exit_after,
        exit_process=exit_process or Recorder(),
    )


def current(jobs: InMemoryJobStore, job: Job) -> Job:
    now = jobs.get(job.job_id)
    assert now is not None
    return now


def test_the_lease_is_renewed_while_the_attempt_runs(jobs: InMemoryJobStore, running: Job) -> None:
    assert running.lease_until is not None
    with guard(jobs, running) as g:
        time.sleep(0.3)  # five times the lease: without renewals it would have run out long ago
        renewed = current(jobs, running).lease_until
        assert renewed is not None
        assert renewed > running.lease_until + timedelta(milliseconds=150)
        assert jobs.claim(running.job_id, worker_id="w2", lease=LEASE, max_attempts=5) is None  # still held
        g.check()
    assert not g.lost.is_set()
    assert current(jobs, running).status is JobStatus.RUNNING


def test_a_take_over_is_noticed_and_check_raises(jobs: InMemoryJobStore, caplog: pytest.LogCaptureFixture) -> None:
    stale = claimed(jobs, new_job(jobs), lease=GONE)  # this worker stalled past its lease...
    winner = claimed(jobs, stale, worker="w2", lease=timedelta(minutes=5))  # ...another claim took the job
    with guard(jobs, stale) as g:
        g.check()  # nothing known yet: the first renewal is a tick away
        assert g.lost.wait(WAIT)
        with pytest.raises(AttemptLost, match="attempt 1"):
            g.check()
    assert current(jobs, stale) == winner  # the stale renewals moved nothing
    assert [getattr(r, "action", None) for r in caplog.records].count("attempt_lost") == 1


def test_a_cancellation_request_is_seen_by_the_renewal_and_check_raises_cancelled(
    jobs: InMemoryJobStore, running: Job, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelling a running job is a request (``request_cancel``): the attempt still holds the job and renews its
    lease, and learns from the renewed row that it is to stop at its next checkpoint."""
    caplog.set_level(logging.INFO)
    with guard(jobs, running) as g:
        g.check()
        assert jobs.request_cancel(running.job_id) is not None
        assert g.cancel_requested.wait(WAIT)
        with pytest.raises(Cancelled, match="cancellation requested"):
            g.check()
        assert not g.lost.is_set()
    assert current(jobs, running).status is JobStatus.RUNNING  # stopping is the settlement's (``stop``)
    assert [getattr(r, "action", None) for r in caplog.records].count("cancel_seen") == 1


def test_a_job_the_reconciler_cancelled_is_lost(jobs: InMemoryJobStore) -> None:
    """A job being cancelled whose attempt let its lease run out is ended by the reconciler (``cancel_expired``):
    the attempt's renewals are refused from then on, so it no longer holds the job."""
    stalled = claimed(jobs, new_job(jobs), lease=GONE)
    assert jobs.request_cancel(stalled.job_id) is not None
    assert jobs.cancel_expired(stalled.job_id) is not None
    with guard(jobs, stalled) as g:
        assert g.lost.wait(WAIT)
        with pytest.raises(AttemptLost):
            g.check()
    assert current(jobs, stalled).status is JobStatus.CANCELLED


def test_observe_takes_what_a_fenced_write_returned(jobs: InMemoryJobStore, running: Job) -> None:
    g = guard(jobs, running)
    g.observe(running)
    g.check()
    g.observe(None)
    with pytest.raises(AttemptLost):
        g.check()


def test_a_failed_renewal_is_tolerated_and_retried(
    jobs: InMemoryJobStore, running: Job, caplog: pytest.LogCaptureFixture
) -> None:
    with guard(jobs, running) as g:
        jobs.failure = DatabaseUnavailable("connection refused")
        time.sleep(0.2)  # several ticks, every renewal failing
        jobs.failure = None
        cleared_at = datetime.now(UTC)
        time.sleep(0.2)
        g.check()
    assert not g.lost.is_set()
    renewed = current(jobs, running).lease_until
    assert renewed is not None
    assert renewed > cleared_at + LEASE  # renewed again once the database answered
    assert "lease_renew_failed" in [getattr(r, "action", None) for r in caplog.records]


def test_the_time_limit_fails_the_job_and_interrupts_it(jobs: InMemoryJobStore, running: Job) -> None:
    interrupt, exit_process = Recorder(), Recorder()
    with guard(jobs, running, timeout=timedelta(milliseconds=150), interrupt=interrupt, exit_process=exit_process) as g:
        assert interrupt.called.wait(WAIT)  # the block stops when interrupted, as Shutdown.interrupt makes it
    [error] = interrupt.calls
    assert isinstance(error, TimedOut)
    assert "time limit" in str(error)
    assert g.timed_out.is_set()
    with pytest.raises(TimedOut):  # a checkpoint reached before the interruption arrives stops it the same way
        g.check()
    failed = current(jobs, running)
    assert (failed.status, failed.error_code, failed.attempts) == (JobStatus.FAILED, "timed_out", 1)
    assert exit_process.calls == []


def test_the_time_limit_of_a_stale_attempt_fails_nothing(jobs: InMemoryJobStore) -> None:
    stale = claimed(jobs, new_job(jobs), lease=GONE)
    winner = claimed(jobs, stale, worker="w2", lease=timedelta(minutes=5))
    interrupt = Recorder()
    with guard(jobs, stale, timeout=timedelta(milliseconds=100), interrupt=interrupt):
        assert interrupt.called.wait(WAIT)
    assert current(jobs, stale) == winner  # fenced: the winner's attempt is not failed


def test_an_attempt_that_cannot_be_interrupted_exits_the_process(jobs: InMemoryJobStore, running: Job) -> None:
    interrupt, exit_process = Recorder(), Recorder()
    started = time.monotonic()
    with guard(
        jobs, running, timeout=timedelta(milliseconds=100), interrupt=interrupt, exit_process=exit_process,
        hard_exit_after=0.2,
    ):  # fmt: skip
        assert exit_process.called.wait(WAIT)  # a hung call: the interrupt changes nothing
    assert exit_process.calls == [EXIT_TIMED_OUT] == [75]
    assert time.monotonic() - started >= 0.3  # the time limit, then the grace to stop
    assert len(interrupt.calls) == 1


def test_an_attempt_that_stops_in_time_after_the_interrupt_does_not_exit(jobs: InMemoryJobStore, running: Job) -> None:
    interrupt, exit_process = Recorder(), Recorder()
    with guard(
        jobs, running, timeout=timedelta(milliseconds=100), interrupt=interrupt, exit_process=exit_process,
        hard_exit_after=0.3,
    ):  # fmt: skip
        assert interrupt.called.wait(WAIT)
        time.sleep(0.1)  # winding down, within hard_exit_after
    time.sleep(0.4)  # past hard_exit_after: an exit would have happened by now
    assert exit_process.calls == []


def test_an_attempt_that_finishes_on_time_neither_fails_nor_exits(jobs: InMemoryJobStore, running: Job) -> None:
    interrupt, exit_process = Recorder(), Recorder()
    with guard(jobs, running, timeout=timedelta(milliseconds=300), interrupt=interrupt, exit_process=exit_process) as g:
        time.sleep(0.05)
    time.sleep(0.4)  # past the time limit: a guard still running would time the attempt out now
    assert (interrupt.calls, exit_process.calls) == ([], [])
    assert not g.timed_out.is_set()
    assert current(jobs, running).status is JobStatus.RUNNING


def test_with_the_real_shutdown_the_time_limit_interrupts_the_main_thread(
    jobs: InMemoryJobStore, running: Job, shutdown: Shutdown
) -> None:
    exit_process = Recorder()
    attempt = AttemptGuard(
        jobs, running, lease=LEASE, timeout=timedelta(milliseconds=100), interrupt=shutdown.interrupt,
        hard_exit_after=WAIT, exit_process=exit_process,
    )  # fmt: skip
    with pytest.raises(TimedOut), attempt, shutdown.interruptible():
        time.sleep(5)  # GPU work that releases the GIL: the signal handler raises long before this returns
    assert current(jobs, running).error_code == "timed_out"
    assert exit_process.calls == []


def test_a_paused_attempt_does_not_run_out_of_time_and_its_lease_is_still_renewed(
    jobs: InMemoryJobStore, running: Job
) -> None:
    """Waiting in the pipeline for its turn is not the attempt's time: the clock stops, the lease does not."""
    interrupt = Recorder()
    with guard(jobs, running, timeout=timedelta(milliseconds=150), interrupt=interrupt) as g:
        g.pause()
        before = current(jobs, running).lease_until
        time.sleep(0.4)  # well past the time limit, paused
        assert (interrupt.calls, g.timed_out.is_set()) == ([], False)
        after = current(jobs, running).lease_until
        assert before is not None
        assert after is not None
        assert after > before
        g.resume()  # the clock runs again, from where it stopped
        assert interrupt.called.wait(WAIT)
    assert isinstance(interrupt.calls[0], TimedOut)
    assert current(jobs, running).error_code == "timed_out"


def test_an_interrupted_attempt_waiting_for_its_settlement_does_not_exit_the_process(
    jobs: InMemoryJobStore, running: Job
) -> None:
    """Its analysis stopped (paused: it waits for the finishing thread, busy with another job's upload) past
    ``hard_exit_after``: it is not hung, so the process does not exit."""
    interrupt, exit_process = Recorder(), Recorder()
    with guard(
        jobs, running, timeout=timedelta(milliseconds=100), interrupt=interrupt, exit_process=exit_process,
        hard_exit_after=0.2,
    ) as g:  # fmt: skip
        assert interrupt.called.wait(WAIT)
        g.pause()  # the analysis raised TimedOut and returned to the pipeline
        time.sleep(0.5)  # past hard_exit_after, still not settled
    assert exit_process.calls == []


def test_resume_wakes_the_guard_so_that_the_time_limit_is_not_late(jobs: InMemoryJobStore, running: Job) -> None:
    """With a long lease the guard's thread sleeps a third of it between renewals; a resumed attempt's time limit
    must not wait for that (it fires within ``WAIT``, not a lease/3 of 100 s later)."""
    interrupt = Recorder()
    g = AttemptGuard(jobs, running, lease=timedelta(minutes=5), timeout=timedelta(milliseconds=100),
                     interrupt=interrupt, hard_exit_after=WAIT, exit_process=Recorder())  # fmt: skip
    with g:
        g.pause()
        time.sleep(0.2)  # paused past the limit: the thread now sleeps until its next renewal
        g.resume()
        assert interrupt.called.wait(WAIT)
    assert isinstance(interrupt.calls[0], TimedOut)


def test_a_forced_shutdown_makes_every_checkpoint_raise_interrupted(jobs: InMemoryJobStore, running: Job) -> None:
    forced = threading.Event()
    g = AttemptGuard(jobs, running, lease=LEASE, timeout=LONG, interrupt=Recorder(), hard_exit_after=WAIT,
                     exit_process=Recorder(), forced=forced)  # fmt: skip
    g.check()
    forced.set()
    with pytest.raises(Interrupted):
        g.check()


def test_a_deferred_call_runs_on_the_guards_thread_when_due_and_a_later_one_replaces_it(
    jobs: InMemoryJobStore, running: Job
) -> None:
    """What keeps a progress report that was not due (gpu_worker.progress): the guard's thread writes it later."""
    ran: list[tuple[str, str]] = []
    done = threading.Event()

    def call(name: str) -> None:
        ran.append((name, threading.current_thread().name))
        done.set()

    with guard(jobs, running) as g:
        g.defer(0.5, lambda: call("replaced"))
        g.defer(1.0, lambda: call("kept"))
        assert done.wait(WAIT)
    assert ran == [("kept", f"attempt-{running.job_id}")]


def test_a_deferred_call_never_runs_after_the_attempt_ended_and_a_failing_one_is_logged(
    jobs: InMemoryJobStore, running: Job, caplog: pytest.LogCaptureFixture
) -> None:
    ran = threading.Event()
    with guard(jobs, running) as g:
        g.defer(0.2, ran.set)
    assert not ran.wait(0.4)  # the guard exited first: the settlement comes next, no write may follow it

    failed = threading.Event()

    def broken() -> None:
        failed.set()
        raise RuntimeError("a bug")

    with guard(jobs, running) as g:
        g.defer(0.0, broken)
        assert failed.wait(WAIT)
        g.defer(0.05, ran.set)  # the thread lived on
        assert ran.wait(WAIT)
        renewed = jobs.get(running.job_id)
        assert renewed is not None
        time.sleep(0.15)  # a renewal tick or two after the failure
        later = jobs.get(running.job_id)
        assert later is not None
        assert later.lease_until is not None
        assert renewed.lease_until is not None
        assert later.lease_until > renewed.lease_until  # still renewing
    assert any(getattr(r, "action", None) == "deferred" for r in caplog.records)


def test_a_deferred_call_that_defers_one_due_at_once_has_it_run(jobs: InMemoryJobStore, running: Job) -> None:
    """Progress.flush re-defers itself when it runs early, by a delay that may be ~0: that call must not be lost."""
    ran = threading.Event()
    with guard(jobs, running) as g:
        g.defer(0.0, lambda: g.defer(0.0, ran.set))
        assert ran.wait(WAIT)


def test_a_kept_report_is_written_by_the_real_guards_thread(jobs: InMemoryJobStore, running: Job) -> None:
    """gpu_worker.progress with the real guard: a report not due is written when it is, with no report after it."""
    from gpu_worker.progress import Progress

    class Flushes:
        def flush(self, job: Job) -> None: ...

    with guard(jobs, running) as g:
        progress = Progress(jobs, g, Flushes(), interval=0.2)
        progress.report("cloud_mask", 0.5)  # within the first interval: kept
        now = jobs.get(running.job_id)
        assert now is not None
        assert now.progress is None
        deadline = time.monotonic() + WAIT
        while (now := jobs.get(running.job_id)) is not None and now.progress is None:
            assert time.monotonic() < deadline, "the kept report was never written"
            time.sleep(0.01)
        assert now is not None
        assert now.progress is not None
        assert (now.progress["stage"], now.progress["fraction"]) == ("cloud_mask", 0.5)
