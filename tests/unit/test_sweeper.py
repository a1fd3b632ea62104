"""The orphan sweeper on the in-memory repository, blob store and publisher (same interfaces as the real ones)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from gpu_worker.sweeper import OrphanSweeper
from shared.errors import BusUnavailable, DatabaseUnavailable, StorageUnavailable
from shared.jobs import Job, JobStatus
from shared.memory import InMemoryBlobStore, InMemoryJobRepository, InMemoryPublisher

STALE = timedelta(0)  # every unsent job counts as an orphan


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


class Repository(InMemoryJobRepository):
    """The in-memory repository, whose database can go away."""

    def __init__(self) -> None:
        super().__init__()
        self.failure: Exception | None = None

    def stale_unsent(self, older_than: timedelta, limit: int) -> list[Job]:
        if self.failure is not None:
            raise self.failure
        return super().stale_unsent(older_than, limit)


@dataclass
class World:
    repo: Repository = field(default_factory=Repository)
    store: InMemoryBlobStore = field(default_factory=InMemoryBlobStore)
    publisher: InMemoryPublisher = field(default_factory=InMemoryPublisher)
    clock: Clock = field(default_factory=Clock)

    def sweeper(self, *, interval: float = 60, older_than: timedelta = STALE, limit: int = 100) -> OrphanSweeper:
        return OrphanSweeper(
            self.repo,
            self.store,
            self.publisher,
            interval=interval,
            older_than=older_than,
            limit=limit,
            clock=self.clock,
        )

    def unsent(self, *, stored: bool = True) -> Job:
        """A job whose submit died after the insert (and, with ``stored``, after the upload)."""
        job_id = uuid.uuid4()
        blob = f"{job_id}/input.tif"
        if stored:
            blob = self.store.put_input(job_id, b"II*\x00", "ab" * 32)
        params = {"bands": ["B04", "B08"], "scale": 10000.0, "analysis": "crop-health"}
        job, _ = self.repo.create(
            job_id=job_id, input_blob=blob, input_sha256="ab" * 32, params=params, idempotency_key=None
        )
        return job

    def job(self, job: Job) -> Job:
        current = self.repo.get(job.job_id)
        assert current is not None
        return current


def test_an_orphan_is_sent_again_and_marked_sent() -> None:
    world = World()
    job = world.unsent()
    assert world.sweeper().sweep() == 1
    assert [m.job_id for m in world.publisher.sent] == [job.job_id]
    assert world.job(job).enqueued_at is not None
    assert world.sweeper().sweep() == 0  # no longer an orphan


def test_an_orphan_without_its_image_fails_with_enqueue_failed() -> None:
    world = World()
    job = world.unsent(stored=False)
    assert world.sweeper().sweep() == 0
    assert world.publisher.sent == []
    current = world.job(job)
    assert (current.status, current.error_code) == (JobStatus.FAILED, "enqueue_failed")


def test_jobs_younger_than_the_age_limit_or_sent_are_left_alone() -> None:
    world = World()
    recent = world.unsent()
    sent = world.unsent()
    world.repo.mark_enqueued(sent.job_id)
    assert world.sweeper(older_than=timedelta(hours=1)).sweep() == 0
    assert world.sweeper().sweep() == 1
    assert [m.job_id for m in world.publisher.sent] == [recent.job_id]


def test_a_sweep_handles_at_most_limit_jobs() -> None:
    world = World()
    for _ in range(3):
        world.unsent()
    assert world.sweeper(limit=2).sweep() == 2
    assert world.sweeper(limit=2).sweep() == 1


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("publisher", BusUnavailable("bus down")),
        ("store", StorageUnavailable("storage down")),
        ("repo", DatabaseUnavailable("database down")),
    ],
    ids=["bus", "storage", "database"],
)
def test_a_backend_outage_ends_the_sweep_and_the_next_one_sends(
    caplog: pytest.LogCaptureFixture, target: str, error: Exception
) -> None:
    world = World()
    job = world.unsent()
    sweeper = world.sweeper()
    getattr(world, target).failure = error
    with caplog.at_level(logging.WARNING):
        assert sweeper.sweep() == 0
    assert any(getattr(r, "action", None) == "sweep_failed" for r in caplog.records)
    assert world.job(job).status is JobStatus.QUEUED
    assert world.job(job).enqueued_at is None
    getattr(world, target).failure = None
    assert sweeper.sweep() == 1
    assert [m.job_id for m in world.publisher.sent] == [job.job_id]


@pytest.mark.parametrize("interval", [0, -1])
def test_an_interval_of_zero_turns_the_sweeper_off(interval: float) -> None:
    world = World()
    world.unsent()
    assert world.sweeper(interval=interval).sweep_if_due() == 0
    assert world.publisher.sent == []


def test_sweeps_are_spaced_by_the_interval() -> None:
    world = World()
    sweeper = world.sweeper(interval=60)
    world.unsent()
    assert sweeper.sweep_if_due() == 1
    world.unsent()
    world.clock.now += 59
    assert sweeper.sweep_if_due() == 0
    world.clock.now += 1
    assert sweeper.sweep_if_due() == 1
