"""The read side of the job API with real backends, through the Functions as the host calls them: ``GET /api/jobs``
(keyset pages and filters on PostgreSQL), ``GET /api/stats`` (the SQL aggregates against numbers computed here, the
queue depths from the emulator through the SDK's administration client) and ``GET /api/health`` (each backend up,
then each one down)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import azure.functions as func
import psycopg
import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.storage.blob import BlobServiceClient

from functions import deps
from functions.deps import Deps
from local.ports import free_port
from shared.bus import JobPublisher
from shared.db import PostgresJobStore
from shared.migrate import migrate
from shared.queue_stats import QueueStats
from shared.storage import BlobStore
from tests.fixtures.servicebus import EmulatorHandle
from tests.functions_client import BASE, body, function
from tests.jobs import PARAMS, new_job

pytestmark = pytest.mark.integration


@pytest.fixture
def environment(
    monkeypatch: pytest.MonkeyPatch, database_url: str, blob_connection_string: str, servicebus_emulator: EmulatorHandle
) -> Iterator[Callable[..., Deps]]:
    """``environment(**overrides)``: the app settings, and the dependencies built as the first request builds them."""
    migrate(database_url)
    suffix = uuid.uuid4().hex[:10]
    base = {
        "DATABASE_URL": database_url,
        "AzureWebJobsStorage": blob_connection_string,
        "ServiceBusConnection": servicebus_emulator.connection_string,
        "IMAGES_CONTAINER": f"images{suffix}",
        "RESULTS_CONTAINER": f"results{suffix}",
        "RETRY_AFTER_SECONDS": "2",
        "WORKER_REGISTRY_INTERVAL": "10",
    }
    with BlobServiceClient.from_connection_string(blob_connection_string) as client:
        client.create_container(base["IMAGES_CONTAINER"])
    built: list[Deps] = []

    def build(**overrides: str) -> Deps:
        for name, value in {**base, **overrides}.items():
            monkeypatch.setenv(name, value)
        deps.use(None)
        built.append(deps.get())
        return built[-1]

    yield build
    deps.use(None)
    for each in built:
        assert each.confirms is not None
        each.confirms.close()
        assert isinstance(each.jobs, PostgresJobStore)
        each.jobs._pool.close()
        assert isinstance(each.blobs, BlobStore)
        each.blobs.close()
        assert isinstance(each.publisher, JobPublisher)
        each.publisher.close()
        assert isinstance(each.queue_stats, QueueStats)
        each.queue_stats.close()


@pytest.fixture
def app_deps(environment: Callable[..., Deps]) -> Deps:
    return environment()


def call(name: str, path: str, params: dict[str, str] | None = None) -> func.HttpResponse:
    response: func.HttpResponse = function(name)(func.HttpRequest("GET", f"{BASE}/{path}", params=params, body=b""))
    return response


def force(d: Deps, job_id: uuid.UUID, status: str, **columns: Any) -> None:
    """Put a job in ``status`` directly (test set-up, not a lifecycle event), with the columns its status requires
    (a running job's lease, a failed job's code) and ``columns`` (values, or SQL expressions as ``sql:...``)."""
    columns = {
        "lease_until": "sql:now() + interval '1 hour'" if status == "running" else None,
        "error_code": columns.pop("error_code", "internal_error") if status == "failed" else None,
        **columns,
    }
    sets, params = [f"status = '{status}'"], []
    for name, value in columns.items():
        if isinstance(value, str) and value.startswith("sql:"):
            sets.append(f"{name} = {value[4:]}")
        else:
            sets.append(f"{name} = %s")
            params.append(value)
    sql(d, f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = %s", (*params, job_id))


def sql(d: Deps, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    assert d.settings.database_url is not None
    with psycopg.connect(d.settings.database_url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


# GET /api/jobs


def test_pages_with_filters_cover_each_matching_job_once_newest_first(app_deps: Deps) -> None:
    t0 = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
    batch_id = uuid.uuid4()
    rows = []
    for i in range(40):
        job = new_job(app_deps.jobs, params={**PARAMS, "analysis": "model:crops" if i % 3 == 0 else "crop-health"})
        status = ("queued", "running", "failed")[(i // 2) % 3]
        created = t0 + timedelta(seconds=i // 4)  # four jobs per instant: the job id breaks the tie
        force(app_deps, job.job_id, status, created_at=created, batch_id=batch_id if i % 5 == 0 else None)
        rows.append((created, job.job_id, status, i))

    def expected(keep: Callable[[tuple[datetime, uuid.UUID, str, int]], bool]) -> list[str]:
        return [str(r[1]) for r in sorted(filter(keep, rows), reverse=True)]

    cases: list[tuple[dict[str, str], Callable[[tuple[datetime, uuid.UUID, str, int]], bool]]] = [
        ({}, lambda r: True),
        ({"status": "running"}, lambda r: r[2] == "running"),
        ({"analysis": "model:crops"}, lambda r: r[3] % 3 == 0),
        ({"batch_id": str(batch_id)}, lambda r: r[3] % 5 == 0),
        (
            {"created_after": "2025-01-31T12:00:02Z", "created_before": "2025-01-31T13:00:07+01:00"},
            lambda r: t0 + timedelta(seconds=2) < r[0] < t0 + timedelta(seconds=7),
        ),
        ({"status": "queued", "analysis": "model:crops"}, lambda r: r[2] == "queued" and r[3] % 3 == 0),
    ]
    for filters, keep in cases:
        seen: list[str] = []
        params = {**filters, "limit": "7"}
        for _ in range(20):
            response = call("list_jobs", "jobs", params)
            assert response.status_code == 200, body(response)
            page = body(response)
            assert len(page["jobs"]) <= 7
            seen += [j["job_id"] for j in page["jobs"]]
            if page["next"] is None:
                break
            params["next"] = page["next"]
        assert seen == expected(keep), filters


def test_a_summary_says_what_the_row_says(app_deps: Deps) -> None:
    job = new_job(app_deps.jobs)
    force(app_deps, job.job_id, "failed", error_code="timed_out", attempts=2, priority="high")
    [summary] = body(call("list_jobs", "jobs"))["jobs"]
    stored = app_deps.jobs.get(job.job_id)
    assert stored is not None
    assert summary == {
        "job_id": str(job.job_id), "status": "failed", "created_at": stored.created_at.isoformat(),
        "updated_at": stored.updated_at.isoformat(), "analysis": "crop-health", "priority": "high", "attempts": 2,
        "batch_id": None, "error_code": "timed_out",
    }  # fmt: skip


def test_the_status_view_shows_the_job_api_fields(app_deps: Deps) -> None:
    job = new_job(app_deps.jobs)
    claimed = app_deps.jobs.claim(job.job_id, worker_id="w", lease=timedelta(minutes=1), max_attempts=5)
    assert claimed is not None
    now = datetime.now(UTC).isoformat()
    app_deps.jobs.progress(job.job_id, 1, {"stage": "indices", "fraction": 0.25, "updated_at": now})
    app_deps.jobs.request_cancel(job.job_id)
    request = func.HttpRequest("GET", f"{BASE}/jobs/{job.job_id}", route_params={"job_id": str(job.job_id)}, body=b"")
    view = body(function("job_status")(request))
    assert view["progress"] == {"stage": "indices", "fraction": 0.25, "updated_at": now}
    assert (view["status"], view["cancel_requested"], view["retries"], view["priority"]) == (
        "running",
        True,
        0,
        "normal",
    )
    assert claimed.started_at is not None
    assert view["started_at"] == claimed.started_at.isoformat()
    assert view["finished_at"] is None


# GET /api/stats


def percentile_cont(values: list[float], q: float) -> float | None:
    """PostgreSQL's ``percentile_cont``: linear interpolation between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def test_the_numbers_match_the_rows(app_deps: Deps) -> None:
    """Jobs at known ages: the counts, windows and percentiles are what the definitions give, computed here."""

    def ago(minutes: float) -> str:
        return f"sql:now() - interval '{minutes} minutes'"

    # (status, created, first started, started, finished) in minutes ago; None: not set
    specs = [
        ("queued", 90, None, None, None),  # the oldest queued: 90 min
        ("queued", 2, None, None, None),
        ("running", 30, 20, 10, None),
        ("succeeded", 50, 40, 40, 30),  # run 10 min, wait 10 min
        ("succeeded", 20, 19, 19, 18),  # run 1 min, wait 1 min
        ("succeeded", 6, 5.5, 4, 3),  # run 1 min (the last attempt), wait 0.5 min; 5-minute window
        ("succeeded", 200, 190, 190, 70),  # finished before the hour: out of every window and percentile
        ("failed", 10, 9, 9, 4),  # 5-minute window
        ("failed", 100, 80, 80, 59),  # 60-minute window only; wait 20 min (first started 80 min ago: out)
        ("cancelled", 3, None, None, 1),
    ]
    for status, created, first, started, finished in specs:
        job = new_job(app_deps.jobs)
        times = {"created_at": created, "first_started_at": first, "started_at": started, "finished_at": finished}
        force(app_deps, job.job_id, status, **{column: ago(v) for column, v in times.items() if v is not None})
    sql(
        app_deps,
        "INSERT INTO workers (worker_id, host, device, current_job, last_beat) VALUES"
        " ('w-live', 'vm-0', 'cuda:0', NULL, now() - interval '5 seconds'),"
        " ('w-late', 'vm-1', 'cpu', NULL, now() - interval '40 seconds'),"  # past 3 x 10 s
        " ('w-gone', 'vm-2', 'cpu', NULL, now() - interval '3 days')",  # not listed
    )
    response = call("stats", "stats")
    assert response.status_code == 200, body(response)
    stats = body(response)

    assert stats["jobs"] == {"queued": 2, "running": 1, "succeeded": 4, "failed": 2, "cancelled": 1}
    assert 90 * 60 - 1 < stats["oldest_queued_age_seconds"] < 90 * 60 + 30
    assert stats["last_5_minutes"] == {"submitted": 2, "succeeded": 1, "failed": 1, "cancelled": 1}
    assert stats["last_60_minutes"] == {"submitted": 7, "succeeded": 3, "failed": 2, "cancelled": 1}
    runs = [600.0, 60.0, 60.0]
    waits = [600.0, 600.0, 60.0, 30.0, 60.0]  # first started within the hour: 20, 40, 19, 5.5 and 9 minutes ago
    for field, values in (("run_seconds", runs), ("queue_wait_seconds", waits)):
        for q in ("p50", "p95"):
            assert stats[field][q] == pytest.approx(percentile_cont(values, int(q[1:]) / 100), abs=0.01), field
    assert [(w["worker_id"], w["alive"]) for w in stats["workers"]] == [("w-late", False), ("w-live", True)]
    assert stats["queues"] == [
        {"name": name, "active": 0, "scheduled": 0, "dead_letter": 0} for name in ("jobs-high", "jobs", "job-events")
    ]
    assert stats["queues_error"] is None


def test_an_empty_database_has_no_percentiles(app_deps: Deps) -> None:
    stats = body(call("stats", "stats"))
    assert stats["jobs"] == dict.fromkeys(("queued", "running", "succeeded", "failed", "cancelled"), 0)
    assert stats["oldest_queued_age_seconds"] is None
    assert stats["run_seconds"] == stats["queue_wait_seconds"] == {"p50": None, "p95": None}
    assert stats["workers"] == []


def test_queue_depths_come_from_the_emulator(app_deps: Deps, servicebus_emulator: EmulatorHandle) -> None:
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        with client.get_queue_sender("jobs-high") as sender:
            sender.send_messages([ServiceBusMessage(str(i)) for i in range(3)])
            sender.schedule_messages(ServiceBusMessage("later"), datetime.now(UTC) + timedelta(hours=1))
        with client.get_queue_receiver("jobs-high") as receiver:
            (first,) = receiver.receive_messages(max_message_count=1, max_wait_time=5)
            receiver.dead_letter_message(first, reason="test")
    stats = body(call("stats", "stats"))
    assert stats["queues"][0] == {"name": "jobs-high", "active": 2, "scheduled": 1, "dead_letter": 1}
    assert stats["queues_error"] is None


@pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning")
def test_the_bus_down_still_answers_the_rest(
    app_deps: Deps, servicebus_emulator: EmulatorHandle, caplog: pytest.LogCaptureFixture
) -> None:
    """(The bound on a bus that does not answer in time: tests/unit/test_stats.py.)"""
    new_job(app_deps.jobs)
    servicebus_emulator.stop()
    response = call("stats", "stats")
    assert response.status_code == 200
    stats = body(response)
    assert (stats["queues"], stats["queues_error"], stats["jobs"]["queued"]) == ([], "unavailable", 1)
    actions = {getattr(r, "action", None) for r in caplog.records}
    assert actions & {"queue_stats_unavailable", "queue_stats_timeout"}, "the bus's failure went unreported"


def test_the_database_down_is_503(environment: Callable[..., Deps]) -> None:
    environment(DATABASE_URL=f"postgresql://nobody@127.0.0.1:{free_port()}/nothing", DB_POOL_MIN_SIZE="0")
    response = call("stats", "stats")
    assert (response.status_code, body(response)["code"]) == (503, "database_unavailable")


# GET /api/health


def test_health_with_everything_up(app_deps: Deps) -> None:
    response = call("health", "health")
    assert response.status_code == 200, body(response)
    checks = body(response)["checks"]
    assert {name: check["ok"] for name, check in checks.items()} == {"database": True, "storage": True,
                                                                      "servicebus": True}  # fmt: skip
    assert all(check["latency_ms"] >= 0 for check in checks.values())


@pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("down", ["database", "storage", "servicebus"])
def test_health_with_one_backend_down(
    environment: Callable[..., Deps],
    blob_connection_string: str,
    servicebus_emulator: EmulatorHandle,
    down: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """(Each probe's bound, and the probes running at once: tests/unit/test_health.py.)"""
    closed = str(free_port())
    overrides = {
        "database": {"DATABASE_URL": f"postgresql://nobody@127.0.0.1:{closed}/nothing", "DB_POOL_MIN_SIZE": "0"},
        "storage": {"AzureWebJobsStorage": blob_connection_string.replace(_blob_port(blob_connection_string), closed)},
        "servicebus": {"ServiceBusConnection": servicebus_emulator.connection_string.replace(
            f":{servicebus_emulator.port};", f":{closed};")},
    }[down]  # fmt: skip
    environment(**overrides)
    response = call("health", "health")
    assert (response.status_code, response.headers["Retry-After"]) == (503, "2")
    answer = body(response)
    assert answer["status"] == "unavailable"
    assert {name: check["ok"] for name, check in answer["checks"].items()} == {
        name: name != down for name in ("database", "storage", "servicebus")
    }
    text = response.get_body().decode()
    for leak in ("127.0.0.1", closed, "psycopg", "Error", "azure", "nobody"):
        assert leak not in text
    reported = {(getattr(r, "check", None), getattr(r, "outcome", None)) for r in caplog.records
                if getattr(r, "action", None) == "health_check"}  # fmt: skip
    assert reported in ({(down, "down")}, {(down, "timeout")})  # the reason went to the log, for that check only


def _blob_port(connection_string: str) -> str:
    endpoint = next(p for p in connection_string.split(";") if p.startswith("BlobEndpoint="))
    return endpoint.split(":")[2].split("/")[0]
