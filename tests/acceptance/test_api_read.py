"""The read side of the job API on the real local Functions host: ``GET /api/jobs`` pages across real jobs with
filters, ``GET /api/stats`` after real jobs (counts checked against the database, queue depths read from the
emulator through the SDK's administration client) and ``GET /api/health``: 200 on the stack, 503 from a second host
whose storage never answers (the probe's bound ends its check), with a body that names nothing."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from local.processes import stop
from local.services import Launcher
from local.stack import REPO_ROOT
from shared.queue_stats import QueueCounts, QueueStats
from tests.acceptance.client import poll, submit
from tests.acceptance.harness import Stack
from tests.integration.worker_helpers import FIELDS
from tests.silent_server import SilentServer

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]

PARAMS = {"bands": "B02,B03,B04,B08"}
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def _submit(api: httpx.Client, n: int) -> list[str]:
    data = FIELDS.read_bytes()  # 128 x 128, four bands: quick to analyse
    job_ids = []
    for _ in range(n):
        response = submit(api, data, params=PARAMS)
        assert response.status_code == 202, response.text
        job_ids.append(response.json()["job_id"])
    return job_ids


def _pages(api: httpx.Client, params: dict[str, str]) -> list[list[dict[str, Any]]]:
    pages, params = [], dict(params)
    while True:
        response = api.get("/api/jobs", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append(page["jobs"])
        if page["next"] is None:
            return pages
        params["next"] = page["next"]


def _db_counts(stack: Stack) -> dict[str, int]:
    with psycopg.connect(stack.database_url) as conn:
        rows = conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
    return {status: 0 for status in STATUSES} | {status: int(n) for status, n in rows}


def test_list_pages_across_real_jobs_with_filters(stack: Stack, api: httpx.Client) -> None:
    stack.stop_workers()  # they stay queued until a worker comes
    since = (datetime.now(UTC) - timedelta(milliseconds=1)).isoformat()
    job_ids = _submit(api, 5)
    newest_first = job_ids[::-1]

    pages = _pages(api, {"created_after": since, "limit": "2"})
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [j["job_id"] for p in pages for j in p] == newest_first
    assert {(j["status"], j["analysis"], j["priority"], j["error_code"]) for p in pages for j in p} == {
        ("queued", "crop-health", "normal", None)
    }
    queued = _pages(api, {"created_after": since, "status": "queued", "limit": "3"})
    assert [j["job_id"] for p in queued for j in p] == newest_first

    stack.start_worker()
    for job_id in job_ids:
        assert poll(api, f"/api/jobs/{job_id}", timeout=60)["status"] == "succeeded"
    succeeded = _pages(api, {"created_after": since, "status": "succeeded", "limit": "4"})
    assert [j["job_id"] for p in succeeded for j in p] == newest_first
    assert _pages(api, {"created_after": since, "status": "queued"}) == [[]]
    before = _pages(api, {"created_after": since, "created_before": "2000-01-01T00:00:00+00:00"})
    assert before == [[]]
    problem = api.get("/api/jobs", params={"status": "done"})
    assert (problem.status_code, problem.json()["code"]) == (400, "invalid_filter")
    problem = api.get("/api/jobs", params={"next": "not-a-cursor"})
    assert (problem.status_code, problem.json()["code"]) == (400, "invalid_cursor")


def test_stats_after_real_jobs(stack: Stack, api: httpx.Client) -> None:
    stack.stop_workers()
    job_ids = _submit(api, 3)
    waiting = api.get("/api/stats")
    assert waiting.status_code == 200, waiting.text
    stats = waiting.json()
    assert stats["queues_error"] is None
    depths = [QueueCounts(**q, total=q["active"] + q["scheduled"] + q["dead_letter"]) for q in stats["queues"]]
    assert [q.name for q in depths] == ["jobs-high", "jobs", "job-events"]
    assert depths[1].active >= 3
    with QueueStats.from_connection_string(stack.state["servicebus_connection_string"]) as admin:
        assert admin.counts([q.name for q in depths]) == depths  # the emulator's numbers, nothing in between
    assert stats["jobs"]["queued"] >= 3
    assert stats["oldest_queued_age_seconds"] >= 0

    stack.start_worker()
    for job_id in job_ids:
        assert poll(api, f"/api/jobs/{job_id}", timeout=60)["status"] == "succeeded"
    stats = api.get("/api/stats").json()
    assert stats["jobs"] == _db_counts(stack)  # nothing runs meanwhile: the same numbers
    assert stats["last_5_minutes"]["submitted"] >= 3
    assert stats["last_5_minutes"]["succeeded"] >= 3
    assert stats["last_60_minutes"]["succeeded"] >= stats["last_5_minutes"]["succeeded"]
    for field in ("run_seconds", "queue_wait_seconds"):
        assert 0 < stats[field]["p50"] <= stats[field]["p95"], stats[field]
    # A job's row says succeeded just before its message is completed (the worker settles after storing the
    # result, on another thread, possibly behind a receive in progress): the last message leaves within moments.
    deadline = time.monotonic() + 15
    while (active := {q["name"]: q["active"] for q in stats["queues"]}["jobs"]) and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = api.get("/api/stats").json()
    assert active == 0
    assert any(w["alive"] for w in stats["workers"])  # the worker's heartbeat row


def test_health_is_ok_on_the_stack(stack: Stack) -> None:
    response = httpx.get(f"{stack.api_url}/health", timeout=30)  # anonymous: no key, no other header
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert body["status"] == "ok"
    assert all(check["ok"] for check in body["checks"].values())


@pytest.fixture
def storage_down_host(stack: Stack) -> Iterator[str]:
    """A second Functions host on the same database and bus, whose storage accepts connections and never answers:
    only the health probe's bound (2 s) can end its check."""
    root = Path(tempfile.mkdtemp(prefix="cropai-health-"))
    with SilentServer() as storage:
        env = {
            **stack.service_env,
            "AzureWebJobsStorage": stack.state["blob_connection_string"].replace(
                f":{_blob_port(stack.state['blob_connection_string'])}/", f":{storage.port}/"
            ),
            "RECONCILE_SCHEDULE": "0 0 0 1 1 *",  # this host's timer stays out of the way
        }
        api_url, service = Launcher(root, REPO_ROOT, env).functions_host(0, env)
        try:
            yield api_url
        finally:
            stop(service)
            shutil.rmtree(root, ignore_errors=True)


def test_health_is_503_naming_nothing_when_storage_is_down(storage_down_host: str) -> None:
    response = httpx.get(f"{storage_down_host}/health", timeout=30)  # without the bound: the storage's timeouts
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert body["status"] == "unavailable"
    assert {name: check["ok"] for name, check in body["checks"].items()} == {
        "database": True,
        "storage": False,
        "servicebus": True,
    }
    assert body["checks"]["storage"]["latency_ms"] == 2000.0  # ended by the bound: a check that timed out
    for leak in ("127.0.0.1", "Error", "azure", "devstoreaccount", "Connection"):
        assert leak not in response.text


def _blob_port(connection_string: str) -> str:
    endpoint = next(p for p in connection_string.split(";") if p.startswith("BlobEndpoint="))
    return endpoint.split(":")[2].split("/")[0]
