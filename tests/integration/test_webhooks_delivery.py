"""Webhook delivery end to end through the real entrypoint: ``function_app``'s ``deliver_webhook`` in the local
Functions host (a subprocess, Service Bus trigger on the emulator's job-events queue), real PostgreSQL, and a real
receiver on loopback that verifies every signature. Short backoffs (1 s, doubled, at most 2 s), 3 attempts, and a
job-events queue with MaxDeliveryCount 2, so that retries, the give-up and the final dead letter all happen within
seconds."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from azure.servicebus import ServiceBusClient, ServiceBusSubQueue
from psycopg import sql

from local.postgres import PostgresServer
from local.servicebus_emulator import EmulatorStartError, start_emulator
from local.servicebus_emulator.process import connection_string
from shared.db import PostgresJobStore, open_pool
from shared.events import BusEventSender, EventStore, OutboxNotifier
from shared.jobs import Callback, Job
from shared.migrate import migrate
from shared.settings import Settings
from shared.webhooks import new_secret
from tests.fixtures.backends import unavailable
from tests.fixtures.servicebus import REPO_CONFIG
from tests.jobs import PARAMS
from tests.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
QUEUE = "job-events"
MAX_DELIVERY_COUNT = 2
WEBHOOK_SETTINGS = {
    "WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver is on loopback, over http
    "WEBHOOK_BACKOFF": "PT1S",
    "WEBHOOK_BACKOFF_MAX": "PT2S",
    "WEBHOOK_MAX_ATTEMPTS": "3",
    "WEBHOOK_TIMEOUT": "2",
}


@dataclass
class Stack:
    jobs: PostgresJobStore
    events: EventStore
    notifier: OutboxNotifier
    bus: ServiceBusClient
    host_log: Callable[[], str]
    api: str


def _emulator_config(path: Path) -> None:
    document = json.loads(REPO_CONFIG.read_text(encoding="utf-8"))
    for queue in document["UserConfig"]["Namespaces"][0]["Queues"]:
        if queue["Name"] == QUEUE:
            queue["Properties"].update({"MaxDeliveryCount": MAX_DELIVERY_COUNT, "LockDuration": "PT10S"})
    path.write_text(json.dumps(document), encoding="utf-8")


@pytest.fixture(scope="module")
def database(postgres_server: PostgresServer) -> Iterator[str]:
    name = f"test_webhooks_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = postgres_server.url.rsplit("/", 1)[0] + f"/{name}"
    migrate(url)
    yield url
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def stack(database: str) -> Iterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="cropai-webhooks-"))
    _emulator_config(root / "servicebus.json")
    try:
        emulator, port = start_emulator(root / "servicebus.json", root / "servicebus")
    except (EmulatorStartError, OSError) as e:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"Service Bus emulator: {e}")
        raise  # unreachable
    bus_connection = connection_string("127.0.0.1", port)
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "SYSTEMROOT")
    env = {name: os.environ[name] for name in keep if name in os.environ} | {
        "PYTHONPATH": str(REPO_ROOT),
        "DATABASE_URL": database,
        "ServiceBusConnection": bus_connection,
        "AzureWebJobsStorage": "UseDevelopmentStorage=true",  # output URLs are signed locally; nothing is stored
        "JOB_EVENTS_QUEUE_NAME": QUEUE,
        "RECONCILE_SCHEDULE": "0 0 0 1 1 *",
        "AzureWebJobs.reconcile_jobs.Disabled": "true",
        **WEBHOOK_SETTINGS,
    }
    argv = [sys.executable, "-m", "local.functions_host", "--port", "0"]
    settings = Settings.from_env({"DATABASE_URL": database, "ServiceBusConnection": bus_connection,
                                  "AzureWebJobsStorage": "unused"})  # fmt: skip
    lines: list[str] = []
    ready = threading.Event()
    try:
        # The context closes the host's stderr pipe however this ends (Popen.__exit__), after the host was stopped.
        with subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True) as host:

            def read() -> None:
                assert host.stderr is not None
                for line in host.stderr:
                    lines.append(line)
                    if "Functions host ready: " in line:
                        ready.set()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            try:
                assert ready.wait(60), "".join(lines)
                api = next(line.split("Functions host ready: ")[1].strip() for line in lines if "host ready" in line)
                with open_pool(settings) as pool, ServiceBusClient.from_connection_string(bus_connection) as bus:
                    events = EventStore(pool)
                    notifier = OutboxNotifier(events, BusEventSender(bus, QUEUE))
                    yield Stack(PostgresJobStore(pool), events, notifier, bus, lambda: "".join(lines), api)
            finally:
                host.send_signal(signal.SIGTERM)
                try:
                    host.wait(15)
                except subprocess.TimeoutExpired:
                    host.kill()
                    host.wait()
                reader.join(5)  # the pipe's end: the reader is done before the pipe is closed
    finally:
        emulator.send_signal(signal.SIGTERM)
        emulator.wait(15)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


def finished_job(stack: Stack, url: str, secret: str) -> Job:
    """A job with a callback, claimed and succeeded; its events flushed, as the worker does."""
    callback = Callback(url=url, secret=secret)
    job, _ = stack.jobs.create(job_id=uuid.uuid4(), input_blob="images/x/input.tif", input_sha256="0" * 64,
                               params=PARAMS, idempotency_key=None, callback=callback)  # fmt: skip
    running = stack.jobs.claim(job.job_id, worker_id="w1", lease=timedelta(minutes=1), max_attempts=5)
    assert running is not None
    outputs = {"ndvi_cog": "http://127.0.0.1:10000/devstoreaccount1/results/x/1/ndvi.tif"}
    assert stack.jobs.succeed(job.job_id, running.attempts, {"ndvi": 0.4, "outputs": outputs}) is not None
    stack.notifier.flush(job)
    return job


def wait_for(condition: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            return found
        time.sleep(0.05)
    return found


def summary(stack: Stack, job: Job) -> dict[str, Any]:
    found = stack.events.summary(job.job_id)
    assert found is not None
    return found


def dead_letters(stack: Stack) -> list[tuple[str, str | None]]:
    with stack.bus.get_queue_receiver(QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as peeker:
        return [(str(m.message_id), m.dead_letter_reason) for m in peeker.peek_messages(max_message_count=50)]


def test_retries_with_backoff_until_the_receiver_takes_it(stack: Stack, receiver: WebhookReceiver) -> None:
    secret = new_secret()
    job = finished_job(stack, receiver.url("/flaky", secret=secret, fail_first=2), secret)
    delivered = wait_for(lambda: summary(stack, job)["delivered"] == 1, timeout=20)
    assert delivered, stack.host_log()
    got = receiver.at("/flaky")
    assert [r.status for r in got] == [500, 500, 200]
    assert all(r.verified for r in got)  # standardwebhooks.Webhook(secret).verify on every attempt
    assert len({r.headers["webhook-id"] for r in got}) == 1  # one event id: the receiver can deduplicate
    gaps = [round(later.at - earlier.at, 2) for earlier, later in itertools.pairwise(got)]
    assert gaps[0] >= 0.9, gaps  # WEBHOOK_BACKOFF 1 s...
    assert gaps[1] >= 1.9, gaps  # ...doubled (capped at 2 s)
    body = got[-1].json()
    assert (body["type"], body["data"]["status"], body["data"]["result"]["ndvi"]) == ("job.succeeded", "succeeded", 0.4)
    assert "sig=" in body["data"]["result"]["outputs"]["ndvi_cog"]  # a read URL, signed at delivery
    seen = summary(stack, job)
    assert {k: seen[k] for k in ("deliveries", "attempts", "last_status", "delivered", "pending", "gave_up")} == {
        "deliveries": 1, "attempts": 3, "last_status": 200, "delivered": 1, "pending": 0, "gave_up": 0,
    }  # fmt: skip
    status = httpx.get(f"{stack.api}/jobs/{job.job_id}", timeout=10).json()
    assert status["webhook"] == seen  # the status view shows the same summary


def test_a_receiver_that_always_fails_is_given_up_and_dead_lettered(stack: Stack, receiver: WebhookReceiver) -> None:
    secret = new_secret()
    job = finished_job(stack, receiver.url("/down", secret=secret, always=503), secret)
    [event] = wait_for(lambda: dead_letters(stack), timeout=25) or [None]
    assert event is not None, stack.host_log()
    event_id = receiver.at("/down")[0].headers["webhook-id"]
    assert event == (f"{event_id}:3", "MaxDeliveryCountExceeded")  # the last attempt's message: the final dead letter
    got = receiver.at("/down")
    assert len(got) == 3 + (MAX_DELIVERY_COUNT - 1)  # three attempts, then each redelivery of the last one POSTs
    seen = summary(stack, job)
    assert (seen["attempts"], seen["last_status"], seen["gave_up"], seen["delivered"], seen["pending"]) == (
        4, 503, 1, 0, 0,
    )  # fmt: skip


def test_410_gone_stops_at_once_without_a_dead_letter(stack: Stack, receiver: WebhookReceiver) -> None:
    secret = new_secret()
    job = finished_job(stack, receiver.url("/gone", secret=secret, always=410), secret)
    assert wait_for(lambda: summary(stack, job)["gave_up"] == 1, timeout=15), stack.host_log()
    time.sleep(1.5)  # past the first backoff: no second attempt comes
    assert len(receiver.at("/gone")) == 1
    event_id = receiver.at("/gone")[0].headers["webhook-id"]
    assert all(not message_id.startswith(event_id) for message_id, _ in dead_letters(stack))
