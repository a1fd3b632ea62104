"""The progress reporter on the in-memory job store, with a hand-driven clock: what is written, when, and what a
write tells the attempt (cancel requested, taken over)."""

from __future__ import annotations

import logging
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


class World:
    def __init__(self) -> None:
        self.jobs = Recording()
        self.job = claimed(self.jobs, new_job(self.jobs))
        self.clock = Clock()
        self.notifier = Notifier()
        self.guard = AttemptGuard(
            self.jobs, self.job, lease=timedelta(minutes=5), timeout=timedelta(minutes=10),
            interrupt=lambda e: None, hard_exit_after=1,
        )  # fmt: skip
        self.progress = Progress(self.jobs, self.guard, self.notifier, interval=1.0, backoff=10.0, clock=self.clock)


@pytest.fixture
def world() -> World:
    return World()


def test_the_first_report_of_each_stage_is_written_at_once_and_notifies(world: World) -> None:
    for stage in STAGES:
        world.progress.report(stage)  # no time passes: only new stages are written
        world.progress.report(stage, 0.5)
    assert world.jobs.writes == [(stage, 0.0, True) for stage in STAGES]
    assert world.notifier.flushed == [world.job.job_id] * len(STAGES)


def test_within_a_stage_writes_are_throttled_to_one_per_interval(world: World) -> None:
    world.progress.report("indices", 0.0)
    for i in range(1, 81):  # 80 windows over 5 s: one report every 62.5 ms
        world.clock.now += 0.0625
        world.progress.report("indices", i / 80)
    assert world.jobs.writes[0] == ("indices", 0.0, True)
    fractions = [fraction for _, fraction, notify in world.jobs.writes[1:] if not notify]
    assert len(fractions) == len(world.jobs.writes) - 1 == 5  # one per second, none notifying
    assert fractions == sorted(fractions)
    assert world.notifier.flushed == [world.job.job_id]


def test_the_row_holds_stage_fraction_and_an_iso_utc_time(world: World) -> None:
    world.progress.report("cloud_mask", 0.123456)
    row = world.jobs.get(world.job.job_id)
    assert row is not None
    assert row.progress is not None
    assert set(row.progress) == {"stage", "fraction", "updated_at"}
    assert (row.progress["stage"], row.progress["fraction"]) == ("cloud_mask", 0.1235)
    updated = datetime.fromisoformat(row.progress["updated_at"])
    assert updated.utcoffset() == timedelta(0)


def test_fractions_are_clamped(world: World) -> None:
    world.progress.report("indices", -1)
    world.clock.now += 1
    world.progress.report("indices", 7)
    assert [fraction for _, fraction, _ in world.jobs.writes] == [0.0, 1.0]


def test_the_stage_never_goes_back(world: World) -> None:
    """The windowed pass interleaves indices and cover per window: once cover is reached, indices only checks."""
    world.progress.report("indices", 0.0)
    world.progress.report("cover", 0.0)
    for i in range(1, 4):
        world.clock.now += 1
        world.progress.report("indices", i / 4)
        world.progress.report("cover", i / 4)
    assert [stage for stage, _, _ in world.jobs.writes] == ["indices", "cover", "cover", "cover", "cover"]


def test_a_write_that_returns_a_cancelled_row_stops_the_attempt_there(world: World) -> None:
    world.progress.report("indices", 0.0)
    assert world.jobs.request_cancel(world.job.job_id) is not None
    world.clock.now += 0.5
    world.progress.report("indices", 0.1)  # throttled: nothing read, nothing known yet
    world.clock.now += 0.5
    with pytest.raises(Cancelled):
        world.progress.report("indices", 0.2)
    with pytest.raises(Cancelled):  # from then on every checkpoint raises, written or not
        world.progress.report("indices", 0.3)


def test_a_refused_write_means_the_attempt_was_taken_over(world: World) -> None:
    expired = world.jobs.get(world.job.job_id)
    assert expired is not None
    world.jobs._jobs[expired.job_id] = expired.model_copy(update={"lease_until": expired.created_at})
    assert claimed(world.jobs, expired, worker="w2").attempts == 2
    with pytest.raises(AttemptLost):
        world.progress.report("download")
    assert world.notifier.flushed == []  # a refused write notified nothing


def test_a_database_error_never_fails_the_job_is_logged_once_per_stage_and_pauses_writes(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.jobs.failure = DatabaseUnavailable("connection refused")
    world.progress.report("indices", 0.0)
    tries = []
    for i in range(1, 40):  # for 9.75 s: paused, nothing tried (a write waits for the pool's timeout)
        world.clock.now += 0.25
        world.progress.report("indices", i / 40)
        tries.append(world.progress._paused_until)
    assert set(tries) == {110.0}
    world.clock.now = 110.0
    world.progress.report("cover", 0.0)  # the pause is over: tried, failed, logged for this stage
    failed = [r for r in caplog.records if getattr(r, "action", None) == "progress_failed"]
    assert [getattr(r, "stage", None) for r in failed] == ["indices", "cover"]
    assert all(r.levelno == logging.WARNING for r in failed)
    assert world.jobs.writes == []
    world.jobs.failure = None
    world.clock.now = 120.0
    world.progress.report("cover", 0.5)
    assert world.jobs.writes == [("cover", 0.5, True)]  # the stage's first write, late, still notifies
