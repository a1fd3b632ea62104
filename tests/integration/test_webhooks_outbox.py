"""The webhook outbox on real PostgreSQL and the Service Bus emulator: the lifecycle writes one event per notifying
transition, the notifier hands each to the job-events queue once even when two flushes race, a flush that cannot
reach the bus leaves the event to the sweep, and one delivery attempt (the Deliverer, in process) reaches a real
loopback receiver or is refused by the SSRF guard."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from azure.servicebus import ServiceBusClient, ServiceBusReceiveMode
from psycopg_pool import ConnectionPool

from shared.db import PostgresJobStore, open_pool
from shared.delivery import Deliverer, WebhookPolicy
from shared.events import BusEventSender, Event, EventMessage, EventStore, OutboxNotifier
from shared.jobs import Callback, Job, JobStatus
from shared.migrate import migrate
from shared.reconciler import Letter, Policy, Reconciler
from shared.settings import Settings
from shared.webhooks import Verdict, new_secret
from tests.fakes import InMemoryBlobStore, InMemoryPublisher
from tests.fixtures.servicebus import EmulatorHandle
from tests.jobs import PARAMS
from tests.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.integration

QUEUE = "job-events"


def settings_for(database_url: str, bus: str = "unused", **extra: str) -> Settings:
    return Settings.from_env(
        {"DATABASE_URL": database_url, "ServiceBusConnection": bus, "AzureWebJobsStorage": "unused", **extra}
    )


@pytest.fixture
def pool(database_url: str) -> Iterator[ConnectionPool]:
    migrate(database_url)
    with open_pool(settings_for(database_url, DB_POOL_MAX_SIZE="8")) as pool:
        yield pool


@pytest.fixture
def jobs(pool: ConnectionPool) -> PostgresJobStore:
    return PostgresJobStore(pool)


@pytest.fixture
def events(pool: ConnectionPool) -> EventStore:
    return EventStore(pool)


@pytest.fixture
def bus(servicebus_emulator: EmulatorHandle) -> Iterator[ServiceBusClient]:
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        yield client


def job_with_callback(jobs: PostgresJobStore, url: str, events: list[str] | None = None, secret: str = "") -> Job:
    job, _ = jobs.create(
        job_id=uuid.uuid4(),
        input_blob="images/x/input.tif",
        input_sha256="0" * 64,
        params=PARAMS,
        idempotency_key=None,
        callback=Callback(url=url, events=events, secret=secret or new_secret()),
    )
    return job


def succeeded(jobs: PostgresJobStore, job: Job, result: dict[str, Any] | None = None) -> Job:
    claimed = jobs.claim(job.job_id, worker_id="w1", lease=timedelta(minutes=1), max_attempts=5)
    assert claimed is not None
    done = jobs.succeed(job.job_id, claimed.attempts, result or {"analysis": "crop-health", "ndvi": 0.4})
    assert done is not None
    return done


def queued_messages(client: ServiceBusClient) -> list[tuple[str, bytes]]:
    with client.get_queue_receiver(QUEUE, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as receiver:
        found = []
        while batch := receiver.receive_messages(max_message_count=50, max_wait_time=1):
            found += [(str(m.message_id), b"".join(m.body)) for m in batch]
    return found


def test_each_notifying_transition_writes_one_event_of_the_groups_asked_for(
    jobs: PostgresJobStore, events: EventStore
) -> None:
    everything = job_with_callback(jobs, "https://hooks.example.com/a", ["started", "progress", "completed"])
    completed_only = job_with_callback(jobs, "https://hooks.example.com/b")
    for job in (everything, completed_only):
        running = jobs.claim(job.job_id, worker_id="w1", lease=timedelta(minutes=1), max_attempts=5)
        assert running is not None
        assert jobs.progress(job.job_id, running.attempts, {"stage": "indices", "fraction": 0.5}, notify=True)
        assert jobs.progress(job.job_id, running.attempts, {"stage": "indices", "fraction": 0.6}, notify=False)
        assert jobs.succeed(job.job_id, running.attempts, {"ndvi": 0.4})
        assert jobs.claim(job.job_id, worker_id="w2", lease=timedelta(minutes=1), max_attempts=5) is None
    types = {job.job_id: [e.type for e in events.unsent(job.job_id, timedelta(0), 10)]
             for job in (everything, completed_only)}  # fmt: skip
    assert types == {
        everything.job_id: ["job.started", "job.progress", "job.succeeded"],
        completed_only.job_id: ["job.succeeded"],
    }


def test_racing_flushes_send_each_event_once(
    jobs: PostgresJobStore, events: EventStore, bus: ServiceBusClient, pool: ConnectionPool, database_url: str
) -> None:
    job = succeeded(jobs, job_with_callback(jobs, "https://hooks.example.com/a", ["started", "completed"]))
    both_read = threading.Barrier(2, timeout=30)

    class Racing(EventStore):
        """Each flush reads the unsent events before either marks them: both send every event."""

        def unsent(self, job_id: uuid.UUID | None, older_than: timedelta, limit: int) -> list[Event]:
            found = super().unsent(job_id, older_than, limit)
            both_read.wait()
            return found

    sends: list[str] = []

    class Counting(BusEventSender):
        def send(self, message: EventMessage, *, at: datetime | None = None) -> None:
            super().send(message, at=at)
            sends.append(message.message_id)

    notifiers = [OutboxNotifier(Racing(pool), Counting(bus, QUEUE)) for _ in range(2)]
    threads = [threading.Thread(target=n.flush, args=(job.job_id,)) for n in notifiers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    sent = queued_messages(bus)
    rows = events.unsent(None, timedelta(0), 10)
    assert rows == []  # every event marked sent
    with psycopg.connect(database_url) as conn:
        ids = [r[0] for r in conn.execute("SELECT event_id FROM job_events ORDER BY created_at").fetchall()]
    assert len(ids) == 2  # job.started, job.succeeded: one row per transition
    assert sorted(sends) == sorted(f"{i}:1" for i in ids * 2)  # both flushes sent every event...
    assert sorted(message_id for message_id, _ in sent) == sorted(f"{i}:1" for i in ids)  # ...the queue kept one
    assert {EventMessage.decode(body) for _, body in sent} == {EventMessage(event_id=i, attempt=1) for i in ids}


def test_a_flush_that_cannot_reach_the_bus_does_not_raise_and_the_sweep_sends_it(
    jobs: PostgresJobStore, events: EventStore, bus: ServiceBusClient, servicebus_emulator: EmulatorHandle
) -> None:
    job = succeeded(jobs, job_with_callback(jobs, "https://hooks.example.com/a"))
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as broken:
        OutboxNotifier(events, BusEventSender(broken, "no-such-queue", timeout=2)).flush(job.job_id)  # logs only
    [left] = events.unsent(None, timedelta(0), 10)
    assert left.job_id == job.job_id
    outbox = OutboxNotifier(events, BusEventSender(bus, QUEUE))
    assert outbox.sweep(timedelta(hours=1), 10) == 0  # not old enough: its notifier may still be at it
    assert outbox.sweep(timedelta(0), 10) == 1
    assert outbox.sweep(timedelta(0), 10) == 0
    assert [m for m, _ in queued_messages(bus)] == [f"{left.event_id}:1"]


def test_the_summary_counts_deliveries_and_attempts(jobs: PostgresJobStore, events: EventStore) -> None:
    plain, _ = jobs.create(job_id=uuid.uuid4(), input_blob="b", input_sha256="0" * 64, params=PARAMS,
                           idempotency_key=None)  # fmt: skip
    assert events.summary(plain.job_id) is None  # no callback, no webhook section
    job = succeeded(
        jobs, job_with_callback(jobs, "https://hooks.example.com/in?token=s3cret", ["started", "completed"])
    )
    started, done = events.unsent(job.job_id, timedelta(0), 10)
    assert events.summary(job.job_id) == {
        "url": "https://hooks.example.com/in?redacted", "events": ["started", "completed"], "deliveries": 2,
        "attempts": 0, "last_status": None, "last_attempt_at": None, "delivered": 0, "pending": 2, "gave_up": 0,
    }  # fmt: skip
    events.record_attempt(started.event_id, status=None, error="ConnectError", delivered=False, gave_up=False)
    events.record_attempt(started.event_id, status=200, error=None, delivered=True, gave_up=False)
    events.record_attempt(done.event_id, status=410, error="HTTP 410", delivered=False, gave_up=True)
    summary = events.summary(job.job_id)
    assert summary is not None
    assert {k: summary[k] for k in ("attempts", "last_status", "delivered", "pending", "gave_up")} == {
        "attempts": 3, "last_status": 410, "delivered": 1, "pending": 0, "gave_up": 1,
    }  # fmt: skip
    assert summary["last_attempt_at"] is not None
    assert events.unsent(None, timedelta(0), 10) == []  # an event the deliverer saw counts as handed over


class RefuseToSend:
    def send(self, message: EventMessage, *, at: object = None) -> None:
        raise AssertionError(f"no next attempt expected, got {message}")


def policy(allow_private: bool) -> WebhookPolicy:
    return WebhookPolicy(max_attempts=3, backoff=timedelta(seconds=1), backoff_max=timedelta(seconds=2), timeout=2.0,
                         allow_private=allow_private, result_url_ttl=timedelta(hours=1))  # fmt: skip


def test_one_attempt_reaches_a_loopback_receiver_signed_with_the_jobs_secret(
    jobs: PostgresJobStore, events: EventStore
) -> None:
    secret = new_secret()
    with WebhookReceiver() as receiver:
        job = succeeded(jobs, job_with_callback(jobs, receiver.url("/ok", secret=secret), secret=secret), {"ndvi": 0.4})
        [event] = events.unsent(job.job_id, timedelta(0), 10)
        verdict = Deliverer(events, RefuseToSend(), policy(True)).handle(
            EventMessage(event_id=event.event_id, attempt=1)
        )
        [got] = receiver.at("/ok")
    assert verdict is Verdict.DELIVERED
    assert got.verified is True
    assert got.headers["webhook-id"] == str(event.event_id)
    assert got.json()["type"] == "job.succeeded"
    assert got.json()["data"] == {
        "job_id": str(job.job_id),
        "status": "succeeded",
        "attempt": 1,
        "result": {"ndvi": 0.4},
    }
    again = Deliverer(events, RefuseToSend(), policy(True)).handle(EventMessage(event_id=event.event_id, attempt=1))
    assert again is None  # already delivered: a redelivered message POSTs nothing


def test_the_ssrf_guard_refuses_a_loopback_target_in_production(jobs: PostgresJobStore, events: EventStore) -> None:
    with WebhookReceiver() as receiver:
        job = succeeded(jobs, job_with_callback(jobs, receiver.url("/internal")))  # stored by a local-dev submit
        [event] = events.unsent(job.job_id, timedelta(0), 10)
        verdict = Deliverer(events, RefuseToSend(), policy(False)).handle(
            EventMessage(event_id=event.event_id, attempt=1)
        )
        assert receiver.at("/internal") == []
    assert verdict is Verdict.GIVE_UP  # no attempt can help, and nothing to dead-letter
    summary = events.summary(job.job_id)
    assert summary is not None
    assert (summary["gave_up"], summary["last_status"], summary["attempts"]) == (1, None, 1)


class NoLetters:
    def receive(self, max_count: int) -> list[Letter]:
        return []

    def complete(self, letter: Letter) -> None:
        raise AssertionError("no letter to complete")


def test_the_reconciler_cancels_an_abandoned_cancellation_and_hands_its_event_over(
    jobs: PostgresJobStore, events: EventStore, bus: ServiceBusClient
) -> None:
    job = job_with_callback(jobs, "https://hooks.example.com/a")
    running = jobs.claim(job.job_id, worker_id="w1", lease=timedelta(seconds=-1), max_attempts=5)  # its worker died
    assert running is not None
    assert jobs.request_cancel(job.job_id) is not None
    outbox = OutboxNotifier(events, BusEventSender(bus, QUEUE))
    policy = Policy(resend_after=timedelta(hours=1), max_attempts=5, batch=10, abort_after=timedelta(hours=1))
    report = Reconciler(jobs, InMemoryBlobStore(), InMemoryPublisher(), NoLetters(), policy, outbox=outbox).run()
    assert (report.cancelled, report.errors) == (1, [])
    now = jobs.get(job.job_id)
    assert now is not None
    assert now.status is JobStatus.CANCELLED
    [(message_id, body)] = queued_messages(bus)
    event = EventMessage.decode(body)
    assert message_id == f"{event.event_id}:1"
    delivery = events.delivery(event.event_id)
    assert delivery is not None
    assert (delivery.type, delivery.payload["status"]) == ("job.cancelled", "cancelled")
    assert events.unsent(None, timedelta(0), 10) == []
