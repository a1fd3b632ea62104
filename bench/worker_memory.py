"""A full tile through the real worker: its peak memory with the pipeline's jobs in flight (issue 10), as JSON.

``python -m bench.worker_memory [--size 10980] [--jobs 2] [--in-flight 2] [--tile-dir .local/bench]``

Starts the local stack without workers (as ``bench.worker_throughput`` does), stores ``--jobs`` copies of the tile of
``bench.analysis --full-tile`` (:func:`bench.analysis.cached_scene`: 10980² x 13 bands, uint16, deflate, 1.95 GB;
made once under ``--tile-dir``) as the inputs of as many crop-health jobs, starts one ``python -m gpu_worker``
as ``make up`` starts it (``WORKER_JOBS_IN_FLIGHT=--in-flight``, every other setting at its default), sends the jobs
and waits until all have succeeded. While they run, the worker process's resident memory is sampled every 0.2 s
from ``/proc``; ``peak_rss_mb`` is the kernel's high-water mark (``VmHWM``) at the end, which no sample can miss.
With 2 in flight the second job's input is downloaded (to disk) and its job claimed while the first is analysed,
and the first's outputs are uploaded while the second is analysed: the peak is the pipeline's, not one analysis'.
Per job: ``run_seconds`` (claim to finish, from the job row) and the outputs' sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

from bench.analysis import cached_scene, cpu_model
from bench.worker_throughput import bench_stack
from local import services
from local.processes import stop
from shared.submission import input_blob_name

log = logging.getLogger("bench.worker_memory")

BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]


def status_kb(pid: int, field: str) -> int | None:
    """A ``VmRSS`` / ``VmHWM`` line of ``/proc/<pid>/status``, in kB (None once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Sampler:
    """The process's RSS every ``interval`` seconds in a thread: the samples' largest and how many were taken."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.monotonic()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = status_kb(self.pid, "VmRSS")
            if rss is not None:
                self.samples.append((time.monotonic() - self._start, rss))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=10980, help="side of the square 13-band tile")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=2, help="WORKER_JOBS_IN_FLIGHT of the worker")
    parser.add_argument("--tile-dir", type=Path, default=Path(".local/bench"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the jobs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(message)s")
    args.tile_dir.mkdir(parents=True, exist_ok=True)
    tile = cached_scene(args.tile_dir, args.size)
    with bench_stack("cropai-bench-memory-") as bench:
        data = tile.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        params = {"bands": BANDS, "scale": 10000.0, "analysis": "crop-health"}
        jobs = []
        started = time.monotonic()
        for _ in range(args.jobs):
            job_id = uuid4()
            job, _ = bench.jobs.create(job_id=job_id, input_blob=input_blob_name(job_id), input_sha256=sha256,
                                       params=params, idempotency_key=None)  # fmt: skip
            bench.store.put_input(job_id, data, sha256)
            jobs.append(job)
        stored = time.monotonic() - started
        del data
        env = {**services.worker_env(bench.env, 1), "WORKER_JOBS_IN_FLIGHT": str(args.in_flight)}
        [worker] = [bench.launcher.worker(0, env)]
        try:
            idle_kb = status_kb(worker.pid, "VmRSS")
            with Sampler(worker.pid) as sampler:
                run = bench.run(jobs, [worker.pid], args.timeout)
            peak_kb = status_kb(worker.pid, "VmHWM")
        finally:
            stop(worker)
        rows = [bench.jobs.get(job.job_id) for job in jobs]
        per_job = [
            {
                "run_seconds": round((r.finished_at - r.started_at).total_seconds(), 1)
                if r.finished_at and r.started_at
                else None,
                "outputs": sorted((r.result or {}).get("outputs", {})),
            }
            for r in rows
            if r is not None
        ]
        report: dict[str, Any] = {
            "benchmark": "worker_memory",
            "tile": {"path": str(tile), "bytes": tile.stat().st_size, "size": args.size, "bands": len(BANDS)},
            "jobs": args.jobs, "worker_jobs_in_flight": args.in_flight,
            "peak_rss_mb": None if peak_kb is None else round(peak_kb / 1024),
            "largest_sample_mb": round(max((kb for _, kb in sampler.samples), default=0) / 1024),
            "samples": len(sampler.samples),
            "idle_rss_mb": None if idle_kb is None else round(idle_kb / 1024),
            "seconds": run["seconds"], "per_job": per_job, "inputs_stored_seconds": round(stored, 1),
            "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "load_1m": os.getloadavg()[0]},
        }  # fmt: skip
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
