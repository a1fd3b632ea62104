"""``GET /api/stats``: the database's numbers and the queues' depths read together, the queues bounded in time and
optional (a bus that cannot say empties ``queues``; a database that cannot is a 503), and the function's answer."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta

import azure.functions as func
import pytest

from functions import deps
from shared.errors import BusUnavailable, DatabaseUnavailable
from shared.queue_stats import QueueCounts
from shared.settings import Settings
from shared.stats import JobCounts, JobStats, Percentiles, Stats, Window, Worker, read_stats
from tests.fakes import InMemoryQueueStats, unit_deps
from tests.functions_client import BASE, body, function

QUEUES = ("jobs-high", "jobs", "job-events")
BEAT = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
WAIT = 5.0  # seconds: a bound on a hang, never a speed claim


class CannedStats:
    """A :class:`shared.stats.StatsSource` that answers what it is given (the SQL is tested on PostgreSQL)."""

    def __init__(self) -> None:
        self.failure: Exception | None = None
        self.alive_within: list[timedelta] = []
        self.stats = JobStats(
            jobs=JobCounts(queued=3, running=1, succeeded=10, failed=2, cancelled=1),
            oldest_queued_age_seconds=12.5,
            last_5_minutes=Window(submitted=4, succeeded=2, failed=0, cancelled=1),
            last_60_minutes=Window(submitted=17, succeeded=10, failed=2, cancelled=1),
            run_seconds=Percentiles(p50=3.0, p95=7.5),
            queue_wait_seconds=Percentiles(p50=None, p95=None),
            workers=[Worker(worker_id="w1", host="vm-0", device="cuda:0", current_job=uuid.UUID(int=7),
                            last_beat=BEAT, alive=True)],
        )  # fmt: skip

    def job_stats(self, alive_within: timedelta) -> JobStats:
        self.alive_within.append(alive_within)
        if self.failure is not None:
            raise self.failure
        return self.stats


def test_the_database_and_the_queues_together() -> None:
    source, queues = CannedStats(), InMemoryQueueStats({"jobs": (5, 2, 1)})
    stats = read_stats(source, queues, QUEUES, alive_within=timedelta(seconds=45))
    assert stats == Stats(
        **dict(source.stats),
        queues=[
            {"name": "jobs-high", "active": 0, "scheduled": 0, "dead_letter": 0},
            {"name": "jobs", "active": 5, "scheduled": 2, "dead_letter": 1},
            {"name": "job-events", "active": 0, "scheduled": 0, "dead_letter": 0},
        ],
        queues_error=None,
    )
    assert source.alive_within == [timedelta(seconds=45)]
    assert sorted(queues.calls) == sorted([q] for q in QUEUES)  # one request per queue, all at once


def test_a_bus_that_cannot_say_empties_the_queues_only(caplog: pytest.LogCaptureFixture) -> None:
    queues = InMemoryQueueStats()
    queues.failure = BusUnavailable("could not read the counts of queue 'jobs': ServiceRequestError: 10.0.0.4")
    stats = read_stats(CannedStats(), queues, QUEUES, alive_within=timedelta(seconds=45))
    assert (stats.queues, stats.queues_error) == ([], "unavailable")
    assert stats.jobs.succeeded == 10
    assert [getattr(r, "action", None) for r in caplog.records] == ["queue_stats_unavailable"]


class GatedQueueStats(InMemoryQueueStats):
    """Each request waits at ``gate`` (its ``wait``, then the counts); ``answered`` counts the requests that ended."""

    def __init__(self, gate: Callable[[], object]) -> None:
        super().__init__()
        self.gate = gate
        self.answered = 0

    def counts(self, queue_names: Sequence[str]) -> list[QueueCounts]:
        self.gate()
        found = super().counts(queue_names)
        self.answered += 1
        return found


def test_a_slow_bus_is_not_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    queues = GatedQueueStats(lambda: release.wait(WAIT))
    try:
        stats = read_stats(CannedStats(), queues, QUEUES, alive_within=timedelta(seconds=45), queue_timeout=0.2)
        assert queues.answered == 0  # it answered while every request was still held
    finally:
        release.set()
    assert (stats.queues, stats.queues_error) == ([], "unavailable")
    assert [getattr(r, "action", None) for r in caplog.records] == ["queue_stats_timeout"]


def test_the_queues_are_read_while_the_database_answers() -> None:
    """The database and every queue meet at a barrier: read one after the other, they would break it."""
    meet = threading.Barrier(len(QUEUES) + 1, timeout=WAIT)
    source, queues = CannedStats(), GatedQueueStats(meet.wait)
    slow = source.job_stats

    def job_stats(alive_within: timedelta) -> JobStats:
        meet.wait()
        return slow(alive_within)

    source.job_stats = job_stats  # type: ignore[method-assign]
    stats = read_stats(source, queues, QUEUES, alive_within=timedelta(seconds=45), queue_timeout=2 * WAIT)
    assert (stats.queues_error, queues.answered) == (None, len(QUEUES))


def test_a_database_that_cannot_say_is_an_error() -> None:
    source = CannedStats()
    source.failure = DatabaseUnavailable("down")
    with pytest.raises(DatabaseUnavailable):
        read_stats(source, InMemoryQueueStats(), QUEUES, alive_within=timedelta(seconds=45))


@pytest.fixture
def world() -> Iterator[tuple[CannedStats, InMemoryQueueStats]]:
    source, queues = CannedStats(), InMemoryQueueStats()
    settings = Settings.from_env(
        {"ServiceBusConnection": "x", "AzureWebJobsStorage": "x", "DATABASE_URL": "x", "WORKER_REGISTRY_INTERVAL": "10",
         "RETRY_AFTER_SECONDS": "4"}
    )  # fmt: skip
    deps.use(
        unit_deps(settings, stats=source, queue_stats=queues)
    )  # fmt: skip
    yield source, queues
    deps.use(None)


def get_stats() -> func.HttpResponse:
    response: func.HttpResponse = function("stats")(func.HttpRequest("GET", f"{BASE}/stats", body=b""))
    return response


def test_the_function_answers_the_contracts_json(world: tuple[CannedStats, InMemoryQueueStats]) -> None:
    source, queues = world
    response = get_stats()
    assert (response.status_code, response.mimetype) == (200, "application/json")
    assert response.headers["Cache-Control"] == "no-store"
    assert body(response) == {
        "jobs": {"queued": 3, "running": 1, "succeeded": 10, "failed": 2, "cancelled": 1},
        "oldest_queued_age_seconds": 12.5,
        "last_5_minutes": {"submitted": 4, "succeeded": 2, "failed": 0, "cancelled": 1},
        "last_60_minutes": {"submitted": 17, "succeeded": 10, "failed": 2, "cancelled": 1},
        "run_seconds": {"p50": 3.0, "p95": 7.5},
        "queue_wait_seconds": {"p50": None, "p95": None},
        "workers": [
            {"worker_id": "w1", "host": "vm-0", "device": "cuda:0", "current_job": str(uuid.UUID(int=7)),
             "last_beat": "2025-01-31T12:00:00+00:00", "alive": True}
        ],
        "queues": [{"name": q, "active": 0, "scheduled": 0, "dead_letter": 0} for q in QUEUES],
        "queues_error": None,
    }  # fmt: skip
    assert source.alive_within == [timedelta(seconds=30)]  # 3 x WORKER_REGISTRY_INTERVAL
    assert sorted(queues.calls) == sorted([q] for q in QUEUES)  # one request per queue, all at once


def test_the_function_answers_503_while_the_database_is_down(world: tuple[CannedStats, InMemoryQueueStats]) -> None:
    world[0].failure = DatabaseUnavailable("PoolTimeout: couldn't get a connection after 2.00 sec (10.0.0.4)")
    response = get_stats()
    assert (response.status_code, response.headers["Retry-After"]) == (503, "4")
    assert body(response)["code"] == "database_unavailable"
    assert "10.0.0.4" not in response.get_body().decode()
