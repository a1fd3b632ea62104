"""The progress reporter on the in-memory job store, with a hand-driven clock: what is written, when, what is kept
for the guard's thread, and what a write tells the attempt (cancel requested, taken over)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from gpu_worker.attempt import AttemptGuard
from gpu_worker.progress import STAGES, Progress
from gpu_worker.settlement import AttemptLost, Cancelled
from shared.errors import DatabaseUnavailable
from shared.jobs import Job
from tests.fakes import InMemoryJobStore
from tests.jobs import claimed, new_job


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recording(InMemoryJobStore):
    """Records each progress write as ``(stage, fraction, notify)``."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, float, bool]] = []

    def progress(self, job_id: UUID, attempt: int, progress: dict[str, Any], *, notify: bool = False) -> Job | None:
        self._fail_if_broken()
        self.writes.append((progress["stage"], progress["fraction"], notify))
        return super().progress(job_id, attempt, progress, notify=notify)


class Notifier:
    def __init__(self) -> None:
        self.flushed: list[UUID] = []

    def flush(self, job: Job) -> None:
        self.flushed.append(job.job_id)


class Deferring(AttemptGuard):
    """The guard, its thread not started: the deferred calls are recorded, and run by the test."""

    def __init__(self, jobs: Recording, job: Job) -> None:
        super().__init__(jobs, job, lease=timedelta(minutes=5), timeout=timedelta(minutes=10),
                         interrupt=lambda e: None, hard_exit_after=1)  # fmt: skip
        self.deferrals: list[float] = []
        self.call: Callable[[], None] | None = None

    def defer(self, delay: float, call: Callable[[], None]) -> None:
        self.deferrals.append(delay)
        self.call = call


class World:
    def __init__(self) -> None:
        self.jobs = Recording()
        self.job = claimed(self.jobs, new_job(self.jobs))
        self.clock = Clock()  # 100.0: the claim
        self.notifier = Notifier()
        self.guard = Deferring(self.jobs, self.job)
        self.progress = Progress(self.jobs, self.guard, self.notifier, interval=1.0, backoff=10.0, clock=self.clock)

    def at(self, now: float) -> None:
        """The clock reaches ``now`` and the guard's thread runs what was deferred to then."""
        self.clock.now = now
        if self.guard.call is not None:
            call, self.guard.call = self.guard.call, None
            call()


@pytest.fixture
def world() -> World:
    return World()


def test_a_job_shorter_than_the_interval_writes_only_its_upload(world: World) -> None:
    """A tiny job: every stage reported within the first second after the claim; only upload, the last stage (the
    checkpoint before any upload), is written, at once, and notifies."""
    for stage in STAGES[:-1]:
        world.clock.now += 0.01
        world.progress.report(stage)
        world.progress.report(stage, 0.5)
    assert world.jobs.writes == []
    assert world.guard.deferrals == [pytest.approx(0.99)]  # the first kept report: written at 101.0 if still kept
    world.clock.now += 0.01
    world.progress.report("upload")
    world.at(101.0)  # the guard's thread: nothing kept any more
    assert world.jobs.writes == [("upload", 0.0, True)]
    assert world.notifier.flushed == [world.job.job_id]


def test_a_kept_report_is_written_by_the_guards_thread_when_no_report_comes(world: World) -> None:
    """A long step with one report (a model's COG build): its stage shows one interval after the last write."""
    world.clock.now = 100.2
    world.progress.report("download")
    world.clock.now = 100.4
    world.progress.report("decode")
    world.progress.report("cloud_mask", 0.25)
    assert world.jobs.writes == []
    world.at(101.0)
    assert world.jobs.writes == [("cloud_mask", 0.25, True)]  # the latest report; download and decode never shown
    world.clock.now = 101.5
    world.progress.report("outputs")  # not due until 102.0: kept, the thread asked again
    assert world.guard.deferrals == [pytest.approx(0.8), pytest.approx(0.5)]
    world.at(102.0)
    assert world.jobs.writes[-1] == ("outputs", 0.0, True)


def test_a_call_before_it_is_due_asks_to_be_called_again(world: World) -> None:
    world.clock.now = 100.5
    world.progress.report("indices", 0.1)
    world.at(100.7)  # early (another report's write moved the due time, say)
    assert world.jobs.writes == []
    assert world.guard.deferrals[-1] == pytest.approx(0.3)
    world.at(101.0)
    assert world.jobs.writes == [("indices", 0.1, True)]


def test_within_a_stage_writes_are_throttled_to_one_per_interval(world: World) -> None:
    world.clock.now = 101.0
    world.progress.report("indices", 0.0)
    for i in range(1, 81):  # 80 windows over 5 s: one report every 62.5 ms
        world.clock.now += 0.0625
        world.progress.report("indices", i / 80)
    assert world.jobs.writes[0] == ("indices", 0.0, True)
    fractions = [fraction for _, fraction, notify in world.jobs.writes[1:] if not notify]
    assert len(fractions) == len(world.jobs.writes) - 1 == 5  # one per second, none notifying
    assert fractions == sorted(fractions)
    assert world.notifier.flushed == [world.job.job_id]


def test_upload_drops_what_was_kept_and_is_never_kept_itself(world: World) -> None:
    """Nothing may be written after the result: from the first upload report on, nothing is kept for the thread."""
    world.clock.now = 101.0
    world.progress.report("outputs")  # written
    world.clock.now = 101.5
    world.progress.report("outputs", 0.5)  # kept
    world.progress.report("upload")  # written at once, the kept report dropped
    world.clock.now = 101.7
    world.progress.report("upload", 0.5)  # not due: not kept either
    world.at(102.5)
    assert world.jobs.writes == [("outputs", 0.0, True), ("upload", 0.0, True)]
    world.progress.report("upload", 0.75)  # due: written
    assert world.jobs.writes[-1] == ("upload", 0.75, False)


def test_the_row_holds_stage_fraction_and_an_iso_utc_time(world: World) -> None:
    world.clock.now = 101.0
    world.progress.report("cloud_mask", 0.123456)
    row = world.jobs.get(world.job.job_id)
    assert row is not None
    assert row.progress is not None
    assert set(row.progress) == {"stage", "fraction", "updated_at"}
    assert (row.progress["stage"], row.progress["fraction"]) == ("cloud_mask", 0.1235)
    updated = datetime.fromisoformat(row.progress["updated_at"])
    assert updated.utcoffset() == timedelta(0)


def test_fractions_are_clamped(world: World) -> None:
    world.clock.now = 101.0
    world.progress.report("indices", -1)
    world.clock.now += 1
    world.progress.report("indices", 7)
    assert [fraction for _, fraction, _ in world.jobs.writes] == [0.0, 1.0]


def test_the_stage_never_goes_back(world: World) -> None:
    """The windowed pass interleaves indices and cover per window: once cover is reached, indices only checks."""
    world.clock.now = 101.0
    world.progress.report("indices", 0.0)
    world.progress.report("cover", 0.0)  # kept
    for i in range(1, 4):
        world.clock.now += 1
        world.progress.report("indices", i / 4)
        world.progress.report("cover", i / 4)
    assert [stage for stage, _, _ in world.jobs.writes] == ["indices", "cover", "cover", "cover"]


def test_a_write_that_returns_a_cancelled_row_stops_the_attempt_there(world: World) -> None:
    world.clock.now = 101.0
    world.progress.report("indices", 0.0)
    assert world.jobs.request_cancel(world.job.job_id) is not None
    world.clock.now += 0.5
    world.progress.report("indices", 0.1)  # throttled: nothing read, nothing known yet
    world.clock.now += 0.5
    with pytest.raises(Cancelled):
        world.progress.report("indices", 0.2)
    with pytest.raises(Cancelled):  # from then on every checkpoint raises, written or not
        world.progress.report("indices", 0.3)


def test_a_cancel_seen_by_the_threads_write_stops_the_next_checkpoint(world: World) -> None:
    world.clock.now = 100.5
    world.progress.report("cloud_mask")
    assert world.jobs.request_cancel(world.job.job_id) is not None
    world.at(101.0)
    with pytest.raises(Cancelled):
        world.progress.report("cloud_mask", 0.5)


def test_a_refused_write_means_the_attempt_was_taken_over(world: World) -> None:
    expired = world.jobs.get(world.job.job_id)
    assert expired is not None
    world.jobs._jobs[expired.job_id] = expired.model_copy(update={"lease_until": expired.created_at})
    assert claimed(world.jobs, expired, worker="w2").attempts == 2
    world.clock.now = 101.0
    with pytest.raises(AttemptLost):
        world.progress.report("download")
    assert world.notifier.flushed == []  # a refused write notified nothing


def test_a_database_error_never_fails_the_job_is_logged_once_per_stage_and_pauses_writes(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.jobs.failure = DatabaseUnavailable("connection refused")
    world.clock.now = 101.0
    world.progress.report("indices", 0.0)
    tries = []
    for i in range(1, 40):  # for 9.75 s: paused, nothing tried (a write waits for the pool's timeout)
        world.clock.now += 0.25
        world.progress.report("indices", i / 40)
        tries.append(world.progress._paused_until)
    assert set(tries) == {111.0}
    world.progress.report("upload")  # not even upload's first report is tried while paused
    world.clock.now = 111.0
    world.progress.report("upload", 0.5)  # the pause is over: tried, failed, logged for this stage
    failed = [r for r in caplog.records if getattr(r, "action", None) == "progress_failed"]
    assert [getattr(r, "stage", None) for r in failed] == ["indices", "upload"]
    assert all(r.levelno == logging.WARNING for r in failed)
    assert world.jobs.writes == []
    world.jobs.failure = None
    world.clock.now = 121.0
    world.progress.report("upload", 0.75)
    assert world.jobs.writes == [("upload", 0.75, True)]  # the stage's first write, late, still notifies
