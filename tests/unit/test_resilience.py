"""Resilience to errors nobody planned for (found by review; each was a defect):

* a database error that is not an ``OperationalError`` (a read-only server: storage full, a failover to a standby)
  is DatabaseUnavailable; and whatever an unexpected error, a settlement still settles, the AttemptGuard thread lives
  on (lease renewals, time limit, hard exit), and one reconciler step failing leaves the others running;
* SystemExit (any BaseException but a shutdown's Interrupted) from the job is charged: never retried for ever;
* a database blip shorter than the lease does not let a live attempt's lease run out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg.errors
import pytest

from gpu_worker.attempt import AttemptGuard
from gpu_worker.settlement import TimedOut
from shared.db import translated
from shared.errors import DatabaseUnavailable, StorageUnavailable
from shared.jobs import Job, JobStatus
from shared.reconciler import Policy, Reconciler
from tests.fakes import InMemoryBlobStore, InMemoryJobStore, InMemoryPublisher, RecordingOutbox
from tests.jobs import GONE, claimed, new_job
from tests.unit.test_consumer_settle import MAX, World
from tests.unit.test_consumer_settle import make_world as make_world
from tests.unit.test_consumer_settle import world as world
from tests.unit.test_reconciler import Inbox

pytestmark = pytest.mark.timeout(20)


def read_only() -> psycopg.errors.ReadOnlySqlTransaction:
    return psycopg.errors.ReadOnlySqlTransaction("cannot execute UPDATE in a read-only transaction")


def test_a_read_only_database_is_translated_to_database_unavailable() -> None:
    @translated
    def update() -> None:
        raise read_only()

    with pytest.raises(DatabaseUnavailable):
        update()


class FailsFromRelease(InMemoryJobStore):
    def __init__(self) -> None:
        super().__init__()
        self.release_error: BaseException | None = None

    def release(self, job_id: Any, attempt: int, *, drain: bool = False) -> Job | None:
        if self.release_error is not None:
            raise self.release_error
        return super().release(job_id, attempt, drain=drain)


def test_a_read_only_database_during_the_settlement_still_settles_the_message(
    make_world: Callable[..., World],
) -> None:
    jobs = FailsFromRelease()
    world = make_world(jobs)
    job = new_job(jobs)
    world.handler.error = StorageUnavailable("throttled")
    jobs.release_error = read_only()
    world.deliver(job)
    assert world.receiver.settled == [("abandon", f"{job.job_id}:1", None)]


class RenewFailsOnce(InMemoryJobStore):
    def __init__(self) -> None:
        super().__init__()
        self.renewals = 0

    def renew_lease(self, job_id: Any, attempt: int, lease: timedelta) -> Job | None:
        self.renewals += 1
        if self.renewals == 1:
            raise read_only()
        return super().renew_lease(job_id, attempt, lease)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_one_odd_renewal_error_does_not_kill_the_guard_and_its_time_limit() -> None:
    jobs = RenewFailsOnce()
    running = claimed(jobs, new_job(jobs), lease=timedelta(milliseconds=60))
    interrupted = threading.Event()
    calls: list[object] = []

    def interrupt(error: BaseException) -> None:
        calls.append(error)
        interrupted.set()

    with AttemptGuard(
        jobs, running, lease=timedelta(milliseconds=60), timeout=timedelta(milliseconds=400),
        interrupt=interrupt, hard_exit_after=5, exit_process=lambda code: None,
    ):  # fmt: skip
        interrupted.wait(3)
    assert jobs.renewals > 1, "the guard thread died at its first renewal: no lease renewal from then on"
    assert [type(c) for c in calls] == [TimedOut], "no time limit: a hung attempt is never stopped nor exited"


def test_one_step_hitting_an_untranslated_database_error_does_not_stop_the_other_steps() -> None:
    jobs = InMemoryJobStore()
    inbox = Inbox()
    reconciler = Reconciler(
        jobs,
        InMemoryBlobStore(),
        InMemoryPublisher(),
        inbox,
        Policy(resend_after=GONE, max_attempts=MAX, batch=10, abort_after=GONE),
        RecordingOutbox(),
    )
    jobs.failure = read_only()  # the fake raises it raw: as an error nobody translated would
    report = reconciler.run()
    assert [e.split(":")[0] for e in report.errors] == ["unconfirmed", "expired", "stranded", "backlog"]
    assert inbox.asked == [10]  # the dead-letter step still ran


def test_a_job_that_raises_system_exit_is_not_retried_for_ever(world: World) -> None:
    job = new_job(world.jobs)
    world.handler.error = SystemExit(1)  # e.g. a library calling sys.exit() on this input
    for _ in range(4 * MAX):
        current = world.job(job)
        if current.status.terminal:
            break
        with pytest.raises(SystemExit):
            world.deliver(current)  # settled as a drain, re-raised: the process exits, a new one gets the job
    now = world.job(job)
    assert now.status is JobStatus.FAILED, (
        f"after {len(world.handler.runs)} runs the job is {now.status.value}, charged {now.charged} of {MAX}"
    )


class RenewOutage(InMemoryJobStore):
    """Renewals 2 and 3 fail (a database failover of about two thirds of a lease); records, at each later renewal,
    whether the lease had already run out."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.lapsed_at_renewal: list[bool] = []

    def renew_lease(self, job_id: Any, attempt: int, lease: timedelta) -> Job | None:
        self.calls += 1
        if self.calls in (2, 3):
            raise DatabaseUnavailable("failover in progress")
        job = self.get(job_id)
        assert job is not None
        assert job.lease_until is not None
        if self.calls > 3:
            self.lapsed_at_renewal.append(job.lease_until < datetime.now(UTC))
        return super().renew_lease(job_id, attempt, lease)


def test_an_outage_shorter_than_the_lease_does_not_let_the_lease_run_out() -> None:
    """A failed renewal is retried after a quarter of the usual interval, not at the next lease/3 tick: two failed
    renewals in a row (an outage of ~2/3 of JOB_LEASE, a typical failover) used to let a live attempt's lease run
    out, and the reconciler could then take it over or, on the last attempt, fail a job about to succeed."""
    jobs = RenewOutage()
    lease = timedelta(milliseconds=300)
    running = claimed(jobs, new_job(jobs), lease=lease)
    with AttemptGuard(
        jobs, running, lease=lease, timeout=timedelta(seconds=30), interrupt=lambda e: None, hard_exit_after=5,
        exit_process=lambda code: None,
    ):  # fmt: skip
        deadline = 50
        while not jobs.lapsed_at_renewal and deadline:
            threading.Event().wait(0.1)
            deadline -= 1
    assert jobs.lapsed_at_renewal[:1] == [False], "the lease ran out while the attempt was alive and renewing"
