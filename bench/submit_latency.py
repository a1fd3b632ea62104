"""Submit latency and end-to-end throughput of the local pipeline, as JSON on stdout.

``python -m bench.submit_latency [--n 50] [--jobs 20] [--workers 1] [--image tests/data/s2_rgbn_fields_128.tif]``

Uses the stack that ``make up`` started when one is running (``.local/stack.json``); otherwise starts its own in a
temporary directory on free ports with ``--workers`` workers, and stops it afterwards.

* ``submit_latency_ms``: ``--n`` sequential ``POST /api/jobs`` of the image, timed from request to 202
  (validation, blob upload, database insert, Service Bus send);
* ``end_to_end``: once those jobs are done, ``--jobs`` jobs submitted back to back, timed from the first request
  until every one is ``succeeded``; ``jobs_per_s`` = jobs / seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from local.stack import DEFAULT_ROOT, REPO_ROOT, StackConfig, down, read_state, running, up

DEFAULT_IMAGE = REPO_ROOT / "tests" / "data" / "s2_rgbn_fields_128.tif"


@contextmanager
def api_url(root: Path, workers: int) -> Iterator[tuple[str, bool]]:
    """The API URL of the running stack, or of one started for the benchmark; (url, started here)."""
    state = read_state(root)
    if state is not None and len(running(state)) == len(state["services"]):
        yield str(state["api_url"]), False
        return
    tmp = Path(tempfile.mkdtemp(prefix="cropai-bench-"))
    tmp.chmod(0o755)  # PostgreSQL runs as nobody when we are root
    environ = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    try:
        config = StackConfig(tmp, 0, 0, 0, 0, workers=workers, env={"RETRY_AFTER_SECONDS": "1"})
        yield str(up(config, environ)["api_url"]), True
    finally:
        down(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def submit(client: httpx.Client, url: str, data: bytes) -> str:
    response = client.post(f"{url}/jobs", content=data, headers={"Content-Type": "image/tiff"})
    if response.status_code != 202:
        raise SystemExit(f"submit answered {response.status_code}: {response.text}")
    return str(response.json()["status_url"])


def wait_all(client: httpx.Client, status_urls: list[str], timeout: float) -> None:
    pending = set(status_urls)
    deadline = time.monotonic() + timeout
    while pending:
        for status_url in list(pending):
            status = client.get(status_url).json()["status"]
            if status == "failed":
                raise SystemExit(f"job failed: {status_url}")
            if status == "succeeded":
                pending.discard(status_url)
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(pending)} jobs not done after {timeout:.0f} s")
        time.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(url: str, data: bytes, n: int, jobs: int, timeout: float) -> dict[str, Any]:
    with httpx.Client(timeout=120) as client:
        submit(client, url, data)  # warm-up: the Functions host builds its clients on the first request
        latencies, status_urls = [], []
        for _ in range(n):
            started = time.perf_counter()
            status_urls.append(submit(client, url, data))
            latencies.append((time.perf_counter() - started) * 1000)
        wait_all(client, status_urls, timeout)
        started = time.perf_counter()
        batch = [submit(client, url, data) for _ in range(jobs)]
        wait_all(client, batch, timeout)
        seconds = time.perf_counter() - started
    return {
        "submit_latency_ms": {
            "n": n,
            "p50": round(percentile(latencies, 0.50), 1),
            "p95": round(percentile(latencies, 0.95), 1),
            "mean": round(statistics.fmean(latencies), 1),
            "max": round(max(latencies), 1),
        },
        "end_to_end": {"jobs": jobs, "seconds": round(seconds, 2), "jobs_per_s": round(jobs / seconds, 2)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.submit_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50, help="sequential submissions timed for latency")
    parser.add_argument("--jobs", type=int, default=20, help="jobs timed end to end")
    parser.add_argument("--workers", type=int, default=1, help="workers, when the benchmark starts its own stack")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where a running stack's stack.json is")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    data = args.image.read_bytes()
    with api_url(args.root, args.workers) as (url, started_here):
        result = measure(url, data, args.n, args.jobs, args.timeout)
    result.update(
        benchmark="submit_latency",
        image={"path": str(args.image), "bytes": len(data)},
        stack={"started_by_benchmark": started_here, "workers": args.workers if started_here else None},
        machine={"cpus": os.cpu_count(), "python": platform.python_version()},
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
