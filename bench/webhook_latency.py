"""Webhook delivery latency on the local stack, as JSON on stdout.

``python -m bench.webhook_latency [--jobs 20] [--burst 20]``

Starts the local stack without workers (``local.stack.up``: PostgreSQL, Azurite, the Service Bus emulator, the
Functions host with ``deliver_webhook``) in a temporary directory on free ports, and a webhook receiver on loopback
that verifies every signature. Each job is created with a ``callback_url`` to the receiver, claimed and succeeded
through the lifecycle (the statement that writes the ``job_events`` row), and its events flushed by the notifier, as
the worker does. The latency of a job is from ``job_events.created_at`` (the completion's commit) to the receipt of
the POST: the flush's send, the queue, the host's trigger, the database reads and the signed POST.

* ``sequential``: ``--jobs`` jobs one after the other, each waited for;
* ``burst``: ``--burst`` jobs completed back to back, then waited for together.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from azure.servicebus import ServiceBusClient

from local.stack import REPO_ROOT, StackConfig, down, up
from shared.db import PostgresJobStore, open_pool
from shared.events import BusEventSender, EventStore, OutboxNotifier
from shared.jobs import Callback
from shared.settings import Settings
from shared.webhooks import new_secret
from tests.webhook_receiver import WebhookReceiver

log = logging.getLogger("bench.webhook_latency")


def _complete(jobs: PostgresJobStore, notifier: OutboxNotifier, url: str, secret: str) -> uuid.UUID:
    job, _ = jobs.create(job_id=uuid.uuid4(), input_blob="images/bench/input.tif", input_sha256="0" * 64,
                         params={"analysis": "crop-health"}, idempotency_key=None,
                         callback=Callback(url=url, secret=secret))  # fmt: skip
    running = jobs.claim(job.job_id, worker_id="bench", lease=timedelta(minutes=1), max_attempts=5)
    assert running is not None
    assert jobs.succeed(job.job_id, running.attempts, {"analysis": "crop-health", "ndvi": 0.4}) is not None
    notifier.flush(job)
    return job.job_id


def _latencies(database_url: str, receiver: WebhookReceiver, path: str, count: int, timeout: float) -> list[float]:
    deadline = time.monotonic() + timeout
    while len(receiver.at(path)) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    got = receiver.at(path)
    if not all(r.verified for r in got):
        raise SystemExit("a delivery failed signature verification")
    with psycopg.connect(database_url) as conn:
        created = {str(event_id): at.timestamp()
                   for event_id, at in conn.execute("SELECT event_id, created_at FROM job_events")}  # fmt: skip
    return [(r.at - created[r.headers["webhook-id"]]) * 1000 for r in got]


def _stats(latencies_ms: list[float], expected: int) -> dict[str, Any]:
    ordered = sorted(latencies_ms)
    if not ordered:
        return {"delivered": 0, "expected": expected}
    return {
        "delivered": len(ordered),
        "expected": expected,
        "p50_ms": round(statistics.median(ordered), 1),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))], 1),
        "max_ms": round(ordered[-1], 1),
        "min_ms": round(ordered[0], 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_latency", description=__doc__)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    root = Path(tempfile.mkdtemp(prefix="cropai-bench-webhooks-"))
    config = StackConfig(root=root, postgres_port=0, azurite_port=0, servicebus_port=0, api_port=0, workers=0,
                         env={"WEBHOOK_ALLOW_PRIVATE": "true", "RECONCILE_SCHEDULE": "0 0 0 1 1 *"})  # fmt: skip
    try:
        state = up(config)
        database_url, bus = state["database_url"], state["servicebus_connection_string"]
        settings = Settings.from_env({"DATABASE_URL": database_url, "ServiceBusConnection": bus,
                                      "AzureWebJobsStorage": state["blob_connection_string"]})  # fmt: skip
        with (
            WebhookReceiver() as receiver,
            open_pool(settings) as pool,
            ServiceBusClient.from_connection_string(bus) as client,
        ):
            jobs = PostgresJobStore(pool)
            notifier = OutboxNotifier(EventStore(pool), BusEventSender(client, settings.job_events_queue))
            secret = new_secret()
            # Warm-up: the host builds its dependencies on the first message.
            _complete(jobs, notifier, receiver.url("/warmup", secret=secret), secret)
            _latencies(database_url, receiver, "/warmup", 1, args.timeout)
            url = receiver.url("/sequential", secret=secret)
            for n in range(args.jobs):
                _complete(jobs, notifier, url, secret)
                _latencies(database_url, receiver, "/sequential", n + 1, args.timeout)
            sequential = _latencies(database_url, receiver, "/sequential", args.jobs, args.timeout)
            url = receiver.url("/burst", secret=secret)
            for _ in range(args.burst):
                _complete(jobs, notifier, url, secret)
            burst = _latencies(database_url, receiver, "/burst", args.burst, args.timeout)
        report = {
            "benchmark": "webhook_latency",
            "measure": "job_events.created_at (completion commit) -> POST received at a loopback receiver",
            "sequential": _stats(sequential, args.jobs),
            "burst": _stats(burst, args.burst),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "repo": str(REPO_ROOT),
        }
        print(json.dumps(report, indent=2))
    finally:
        down(root)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
