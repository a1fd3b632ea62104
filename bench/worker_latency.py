"""The worker's reaction times on real backends, as JSON on stdout.

``python -m bench.worker_latency [--pickups 10] [--cancels 5]``

Starts the local stack without workers (``local.stack.up``: PostgreSQL, Azurite, the Service Bus emulator, the
Functions host, its timer out of the way) in a temporary directory on free ports, and runs the worker in this process
(``gpu_worker.app.run``, the wiring of ``python -m gpu_worker``) with a stand-in analyzer that sleeps and reports
progress as the real one does per window (``tests.integration.worker_helpers.SlowAnalyzer``), on CPU. The settings
are the defaults (``WORKER_MAX_WAIT_TIME`` 0.5 s, ``JOB_LEASE`` 2 min: a cancellation is seen through the progress
writes, not the lease renewals). A client thread meanwhile submits (create, send on a long-lived sender, confirm):

* ``idle_pickup_ms``: an idle worker (its last job done, then 0.5 to 1.5 s of idle polling, a random phase of its
  receive cycle) is sent a job, alternately ``high`` and ``normal``: from before the send to ``started_at``;
* ``cancel_to_stop_ms``: a running job (a 60 s analysis, in its ``indices`` stage, then a random 0 to 1 s: a random
  phase of the 1 s progress writes) is cancelled (``request_cancel``): from ``cancel_requested_at`` to
  ``finished_at``, both on the database's clock. One worker run per cancellation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from gpu_worker.app import run
from local.stack import REPO_ROOT, StackConfig, down, up
from shared.bus import JobPublisher
from shared.jobs import Job, JobStatus, Priority
from tests.integration.worker_helpers import FIELDS, SlowAnalyzer, WorkerStack, open_worker_stack

DEFAULTS = {"WORKER_MAX_WAIT_TIME": "0.5", "JOB_LEASE": "PT2M"}  # open_worker_stack's test values, put back


def _until(stack: WorkerStack, job_id: UUID, ready: Callable[[Job], bool], timeout: float) -> Job:
    deadline = time.monotonic() + timeout
    while not ready(job := stack.job(job_id)):
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} never got there: {job.status}")
        time.sleep(0.01)
    return job


def _in_background(client: Callable[[], None]) -> Callable[[], None]:
    """Start ``client`` in a thread; the returned call joins it and re-raises what it raised. A client that fails
    stops the worker as SIGTERM does (it would otherwise wait for jobs that never come)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            client()
        except BaseException as e:
            errors.append(e)
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=target, name="bench-client", daemon=True)
    thread.start()

    def join() -> None:
        thread.join()
        if errors:
            raise errors[0]

    return join


def _pickups(stack: WorkerStack, count: int, timeout: float) -> dict[str, list[float]]:
    publisher = JobPublisher(stack.client, stack.queues)  # its senders close with the stack's client
    kinds: list[Priority] = ["high", "normal"]
    latencies: dict[str, list[float]] = {kind: [] for kind in kinds}

    def client() -> None:
        for n in range(2 + count):  # the first two open the senders and the worker's links: not measured
            kind = kinds[n % 2]
            message = stack.create_job(FIELDS.read_bytes(), priority=kind)
            time.sleep(random.uniform(0.5, 1.5))  # the worker idles, polling both queues
            sent = datetime.now(UTC)
            publisher.send(message)
            stack.jobs.confirm_sent(message.job_id, message.generation)
            job = _until(stack, message.job_id, lambda j: j.started_at is not None, timeout)
            assert job.started_at is not None
            if n >= 2:
                latencies[kind].append((job.started_at - sent).total_seconds() * 1000)
            _until(stack, message.job_id, lambda j: j.status.terminal, timeout)

    join = _in_background(client)
    run(stack.settings(**DEFAULTS), analyzer=SlowAnalyzer(0.1), max_jobs=2 + count)
    join()
    return latencies


def _cancel_to_stop(stack: WorkerStack, timeout: float) -> float:
    job_id = stack.submit(FIELDS.read_bytes())

    def client() -> None:
        _until(stack, job_id, lambda j: j.progress is not None and j.progress["stage"] == "indices", timeout)
        time.sleep(random.uniform(0.0, 1.0))
        if stack.jobs.request_cancel(job_id) is None:
            raise SystemExit(f"job {job_id} could not be cancelled: {stack.job(job_id).status}")

    join = _in_background(client)
    run(stack.settings(**DEFAULTS), analyzer=SlowAnalyzer(60), max_jobs=1)
    join()
    job = stack.job(job_id)
    if job.status is not JobStatus.CANCELLED or job.finished_at is None or job.cancel_requested_at is None:
        raise SystemExit(f"job {job_id} is {job.status}, not cancelled")
    return (job.finished_at - job.cancel_requested_at).total_seconds() * 1000


def _stats(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 1),
        "p90": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))], 1),
        "min": round(ordered[0], 1),
        "max": round(ordered[-1], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pickups", type=int, default=10, help="idle pick-ups measured per priority")
    parser.add_argument("--cancels", type=int, default=5, help="cancellations measured (one worker run each)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a job to move")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    root = Path(tempfile.mkdtemp(prefix="cropai-bench-worker-"))
    config = StackConfig(root=root, postgres_port=0, azurite_port=0, servicebus_port=0, api_port=0, workers=0,
                         env={"RECONCILE_SCHEDULE": "0 0 0 1 1 *"})  # fmt: skip
    try:
        state = up(config)
        stack = open_worker_stack(state["servicebus_connection_string"], state["database_url"],
                                  state["blob_connection_string"], root)  # fmt: skip
        try:
            pickups = _pickups(stack, 2 * args.pickups, args.timeout)
            cancels = [_cancel_to_stop(stack, args.timeout) for _ in range(args.cancels)]
        finally:
            stack.close()
        report = {
            "benchmark": "worker_latency",
            "idle_pickup_ms": {kind: _stats(samples) for kind, samples in pickups.items()},
            "cancel_to_stop_ms": _stats(cancels),
            "settings": DEFAULTS,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "arch": platform.machine()},
            "repo": str(REPO_ROOT),
        }
        print(json.dumps(report, indent=2))
    finally:
        down(root)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
