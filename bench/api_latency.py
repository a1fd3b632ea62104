"""Latency of the API's reads on the local Functions host, as JSON on stdout.

``python -m bench.api_latency [--n 300] [--workers 1]``

Uses the stack that ``make up`` started when one is running (``.local/stack.json``); otherwise starts its own in a
temporary directory on free ports and stops it afterwards. One job is submitted and run to ``succeeded`` first, so
that its status carries a result with signed output URLs (the heaviest status answer). Then, ``--n`` sequential
requests each, on one keep-alive connection, after a warm-up:

* ``status_ms``: ``GET /api/jobs/{id}`` of that job; ``raw_select_ms``: the same row read by ``psycopg`` directly
  (the status query's ``SELECT``, one connection, no HTTP), so ``status - raw_select`` is the cost of the host, the
  function, the pool and the view; ``status_p50_ms``, and ``status_over_raw_select`` = status p50 / raw select p50;
* ``stats_ms``: ``GET /api/stats`` (the database aggregates, and the three queues' counts from the management API);
* ``list_ms``: ``GET /api/jobs?limit=100``; ``health_ms``: ``GET /api/health``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg

from local.stack import DEFAULT_ROOT, REPO_ROOT, StackConfig, down, read_state, running, up

IMAGE = REPO_ROOT / "tests" / "data" / "s2_rgbn_fields_128.tif"
RAW_SELECT = (
    "SELECT j.*, r.result FROM jobs j LEFT JOIN results r USING (job_id) WHERE j.job_id = %s"  # what get() reads
)


@contextmanager
def stack(root: Path, workers: int) -> Iterator[tuple[dict[str, Any], bool]]:
    """The running stack's state, or that of one started for the benchmark; (state, started here)."""
    state = read_state(root)
    if state is not None and len(running(state)) == len(state["services"]):
        yield state, False
        return
    tmp = Path(tempfile.mkdtemp(prefix="cropai-bench-"))
    tmp.chmod(0o755)  # PostgreSQL runs as nobody when we are root
    environ = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    try:
        config = StackConfig(tmp, 0, 0, 0, 0, workers=workers, env={"RETRY_AFTER_SECONDS": "1"})
        yield up(config, environ), True
    finally:
        down(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def timed(call: Callable[[], object], n: int) -> dict[str, float]:
    for _ in range(max(5, n // 20)):  # warm-up: clients built, connections pooled, plans cached
        call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(n - 1, round(q * (n - 1)))], 3)

    return {"n": n, "p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1], 3)}


def succeeded_job(client: httpx.Client, url: str, timeout: float) -> str:
    response = client.post(
        f"{url}/jobs", content=IMAGE.read_bytes(), params={"bands": "B02,B03,B04,B08"},
        headers={"Content-Type": "image/tiff"},
    )  # fmt: skip
    if response.status_code != 202:
        raise SystemExit(f"submit answered {response.status_code}: {response.text}")
    job_id = str(response.json()["job_id"])
    deadline = time.monotonic() + timeout
    while (status := client.get(f"{url}/jobs/{job_id}").json()["status"]) != "succeeded":
        if status == "failed" or time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} is {status}; a worker must run it (--workers 1)")
        time.sleep(0.1)
    return job_id


def ok(response: httpx.Response, *statuses: int) -> None:
    if response.status_code not in (statuses or (200,)):
        raise SystemExit(f"{response.request.url} answered {response.status_code}: {response.text[:300]}")


def measure(state: dict[str, Any], n: int, timeout: float) -> dict[str, Any]:
    url = str(state["api_url"])
    with httpx.Client(timeout=60) as client, psycopg.connect(str(state["database_url"]), autocommit=True) as conn:
        job_id = succeeded_job(client, url, timeout)
        result: dict[str, Any] = {"job_id": job_id}
        result["status_ms"] = timed(lambda: ok(client.get(f"{url}/jobs/{job_id}")), n)
        result["raw_select_ms"] = timed(lambda: conn.execute(RAW_SELECT, (job_id,)).fetchone(), n)
        result["stats_ms"] = timed(lambda: ok(client.get(f"{url}/stats")), n)
        result["list_ms"] = timed(lambda: ok(client.get(f"{url}/jobs", params={"limit": "100"})), n)
        result["health_ms"] = timed(lambda: ok(client.get(f"{url}/health")), n)
        stats = client.get(f"{url}/stats").json()
    result["status_overhead_p50_ms"] = round(result["status_ms"]["p50"] - result["raw_select_ms"]["p50"], 3)
    result["status_p50_ms"] = result["status_ms"]["p50"]
    result["status_over_raw_select"] = round(result["status_ms"]["p50"] / result["raw_select_ms"]["p50"], 2)
    result["jobs_in_database"] = sum(stats["jobs"].values())
    result["queues_error"] = stats["queues_error"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="sequential requests timed per endpoint")
    parser.add_argument("--workers", type=int, default=1, help="workers, when the benchmark starts its own stack")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where a running stack's stack.json is")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the job to succeed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with stack(args.root, args.workers) as (state, started_here):
        result = measure(state, args.n, args.timeout)
    result.update(
        benchmark="api_latency",
        stack={"started_by_benchmark": started_here, "workers": args.workers if started_here else None},
        machine={"cpus": os.cpu_count(), "python": platform.python_version()},
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
