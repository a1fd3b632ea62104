"""``GET /api/health``: three probes at once, each bounded; any failure is "down" with its reason in the log only;
one round at a time, its answer reused for the TTL, a hung probe never started twice; the function answers 200 or
503 (``Retry-After``), anonymously, with a body that names nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import azure.functions as func
import pytest

from functions import deps
from local.functions_host.bindings import trigger_binding
from shared.errors import BusUnavailable, DatabaseUnavailable, StorageUnavailable
from shared.health import Health, HealthMonitor, Probe
from shared.settings import Settings
from tests.fakes import InMemoryBlobStore, InMemoryJobStore, InMemoryQueueStats, unit_deps
from tests.functions_client import BASE, body, function, indexed

SECRET = "psycopg.OperationalError: connection to server at 10.0.0.4 (pg-prod.internal), port 5432 failed"


def fine() -> None:
    return None


def broken() -> None:
    raise DatabaseUnavailable(SECRET)


def check_health(database: Probe, storage: Probe, servicebus: Probe, *, timeout: float = 2.0) -> Health:
    """One round of a fresh monitor."""
    return HealthMonitor(database, storage, servicebus, timeout=timeout).check()


def test_every_check_ok() -> None:
    health = check_health(fine, fine, fine)
    assert health.ok
    assert health.status == "ok"
    assert all(check.ok and check.latency_ms >= 0 for check in dict(health.checks).values())


def test_one_failure_makes_it_unavailable_and_the_reason_goes_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    health = check_health(fine, broken, fine)
    assert (health.status, health.checks.database.ok, health.checks.storage.ok) == ("unavailable", True, False)
    assert SECRET not in health.model_dump_json()
    [record] = [r for r in caplog.records if getattr(r, "action", None) == "health_check"]
    assert (getattr(record, "check", None), getattr(record, "outcome", None)) == ("storage", "down")
    assert SECRET in record.getMessage()


def test_a_bug_in_a_probe_is_down_too() -> None:
    def bug() -> None:
        raise KeyError("nir")

    assert not check_health(fine, fine, bug).checks.servicebus.ok


def test_a_probe_that_hangs_is_down_once_the_bound_passes() -> None:
    release, ended = threading.Event(), threading.Event()

    def hangs() -> None:
        release.wait(10)
        ended.set()

    health = check_health(fine, fine, hangs, timeout=0.2)
    assert not ended.is_set()  # answered while the probe still hung
    release.set()
    assert health.checks.servicebus.model_dump() == {"ok": False, "latency_ms": 200.0}
    assert health.checks.database.ok


def test_the_probes_run_at_the_same_time() -> None:
    meet = threading.Barrier(3, timeout=5)  # probes run one after the other would break it: each would be down
    health = check_health(meet.wait, meet.wait, meet.wait, timeout=10)
    assert health.ok


class Counted:
    """A probe that counts its calls and returns once ``gate`` is open."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate or threading.Event()
        if gate is None:
            self.gate.set()
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        self.gate.wait(10)


class Clock:
    """A hand-driven clock that counts its reads (each request reads it once, under the monitor's lock)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def test_an_answer_is_reused_for_the_ttl_then_the_backends_are_probed_again() -> None:
    probes, clock = [Counted() for _ in range(3)], Clock()
    monitor = HealthMonitor(*probes, ttl=5.0, clock=clock)
    first = monitor.check()
    clock.now += 4.9
    assert monitor.check() is first
    assert [p.calls for p in probes] == [1, 1, 1]
    clock.now += 0.1
    assert monitor.check().ok
    assert [p.calls for p in probes] == [2, 2, 2]


def test_concurrent_requests_share_one_round() -> None:
    gate, clock = threading.Event(), Clock()
    probes = [Counted(gate) for _ in range(3)]
    monitor = HealthMonitor(*probes, ttl=5.0, clock=clock)
    gate.set()
    monitor.check()  # an answer, now stale
    gate.clear()
    clock.now += 5
    clock.reads = 0
    answers: list[Health] = []
    threads = [threading.Thread(target=lambda: answers.append(monitor.check())) for _ in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while clock.reads < len(threads):  # every request has found the answer stale: it leads the round or waits for it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gate.set()
    for thread in threads:
        thread.join(5)
    assert len(answers) == len(threads)
    assert all(answer is answers[0] for answer in answers)
    assert [p.calls for p in probes] == [2, 2, 2]


def test_a_probe_still_running_from_an_earlier_round_is_down_and_not_started_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hung = Counted(threading.Event())
    monitor = HealthMonitor(fine, fine, hung, timeout=0.1, ttl=0)
    assert not monitor.check().checks.servicebus.ok  # timed out
    again = monitor.check()  # down at once: not started again, so not waited for
    assert (again.checks.servicebus.model_dump(), again.checks.database.ok) == ({"ok": False, "latency_ms": 100.0},
                                                                                True)  # fmt: skip
    assert hung.calls == 1
    outcomes = [getattr(r, "outcome", None) for r in caplog.records if getattr(r, "check", None) == "servicebus"]
    assert outcomes == ["timeout", "hung"]
    hung.gate.set()
    deadline = time.monotonic() + 5
    while not monitor.check().ok:  # down until its first run has ended; then started again, and up
        assert time.monotonic() < deadline
    assert hung.calls == 2


@dataclass
class World:
    jobs: InMemoryJobStore
    blobs: InMemoryBlobStore
    queues: InMemoryQueueStats


@pytest.fixture
def world() -> Iterator[World]:
    w = World(InMemoryJobStore(), InMemoryBlobStore(), InMemoryQueueStats())
    settings = Settings.from_env(
        {"ServiceBusConnection": "x", "AzureWebJobsStorage": "x", "DATABASE_URL": "x", "RETRY_AFTER_SECONDS": "4"}
    )
    deps.use(
        unit_deps(settings, jobs=w.jobs, blobs=w.blobs, queue_stats=w.queues)
    )  # fmt: skip
    yield w
    deps.use(None)


def get_health() -> func.HttpResponse:
    response: func.HttpResponse = function("health")(func.HttpRequest("GET", f"{BASE}/health", body=b""))
    return response


def test_the_function_answers_200_when_all_is_up(world: World) -> None:
    response = get_health()
    assert (response.status_code, response.mimetype) == (200, "application/json")
    assert response.headers["Cache-Control"] == "no-store"
    assert "Retry-After" not in response.headers
    answer = body(response)
    assert answer["status"] == "ok"
    assert {name: set(check) for name, check in answer["checks"].items()} == {
        name: {"ok", "latency_ms"} for name in ("database", "storage", "servicebus")
    }
    assert world.queues.calls == [["jobs"]]


def test_repeated_requests_probe_the_backends_once_per_ttl(world: World) -> None:
    for _ in range(5):
        assert get_health().status_code == 200
    assert world.queues.calls == [["jobs"]]


@pytest.mark.parametrize("down", ["database", "storage", "servicebus"])
def test_the_function_answers_503_naming_nothing_when_one_is_down(world: World, down: str) -> None:
    if down == "database":
        world.jobs.failure = DatabaseUnavailable(SECRET)
    elif down == "storage":
        world.blobs.failure = StorageUnavailable(SECRET)
    else:
        world.queues.failure = BusUnavailable(SECRET)
    response = get_health()
    assert (response.status_code, response.headers["Retry-After"]) == (503, "4")
    assert response.headers["Cache-Control"] == "no-store"
    answer = body(response)
    assert answer["status"] == "unavailable"
    assert {name: check["ok"] for name, check in answer["checks"].items()} == {
        name: name != down for name in ("database", "storage", "servicebus")
    }
    text = response.get_body().decode()
    for leak in ("10.0.0.4", "psycopg", "pg-prod", "Error", "5432"):
        assert leak not in text


def test_health_is_anonymous_and_the_rest_needs_the_function_key() -> None:
    def auth_level(name: str) -> str:
        trigger = trigger_binding(indexed()[name], "httpTrigger")
        assert trigger is not None
        return str(trigger["authLevel"]).lower()

    assert auth_level("health") == "anonymous"
    assert {auth_level(name) for name in ("list_jobs", "stats", "job_status")} == {"function"}
