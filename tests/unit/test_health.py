"""``GET /api/health``: three probes at once, each bounded; any failure is "down" with its reason in the log only;
the function answers 200 or 503 (``Retry-After``), anonymously, with a body that names nothing."""

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
from shared.health import check_health
from shared.settings import Settings
from tests.fakes import InMemoryBlobStore, InMemoryJobStore, InMemoryQueueStats, unit_deps
from tests.functions_client import BASE, body, function, indexed

SECRET = "psycopg.OperationalError: connection to server at 10.0.0.4 (pg-prod.internal), port 5432 failed"


def fine() -> None:
    return None


def broken() -> None:
    raise DatabaseUnavailable(SECRET)


def test_every_check_ok() -> None:
    health = check_health(fine, fine, fine)
    assert health.ok
    assert health.status == "ok"
    assert all(check.ok and 0 <= check.latency_ms < 100 for check in dict(health.checks).values())


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
    release = threading.Event()
    started = time.monotonic()
    health = check_health(fine, fine, lambda: release.wait(10), timeout=0.2)
    elapsed = time.monotonic() - started
    release.set()
    assert elapsed < 1
    assert health.checks.servicebus.model_dump() == {"ok": False, "latency_ms": 200.0}
    assert health.checks.database.ok


def test_the_probes_run_at_the_same_time() -> None:
    started = time.monotonic()
    health = check_health(*[lambda: time.sleep(0.3)] * 3, timeout=2)
    assert time.monotonic() - started < 0.6
    assert health.ok
    assert all(check.latency_ms >= 300 for check in dict(health.checks).values())


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
